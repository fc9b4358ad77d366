#!/usr/bin/env bash
# Fetch the current Debian cloud kernel (linux-image-cloud-amd64) for cryo tests.
#
# Downloads the real linux-image-<ver>-cloud-amd64 package behind the
# metapackage with `apt-get download` (nothing is installed), unpacks it with
# `dpkg-deb -x` into a temporary directory and caches, under
# ${XDG_CACHE_HOME:-$HOME/.cache}/cryo/:
#   debian-cloud-bzImage   the /boot/vmlinuz-* of the package
#   debian-cloud-vmlinux   the ELF vmlinux extracted from that bzImage
#   debian-cloud-version   the package version (one line)
#
# If these files already exist and are valid, it prints their paths and exits
# without touching the network. The last line printed is always the cache dir.
#
# Usage: fetch-kernel.sh [--print-dir] [--force]
#   --print-dir  print the cache directory and exit
#   --force      re-download even if the cache is valid
set -euo pipefail

META_PKG=linux-image-cloud-amd64
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/cryo"
BZIMAGE="$CACHE_DIR/debian-cloud-bzImage"
VMLINUX="$CACHE_DIR/debian-cloud-vmlinux"
VERSION_FILE="$CACHE_DIR/debian-cloud-version"

die() {
    echo "fetch-kernel.sh: error: $*" >&2
    exit 1
}

log() {
    echo "fetch-kernel.sh: $*" >&2
}

force=0
for arg in "$@"; do
    case "$arg" in
        --print-dir)
            echo "$CACHE_DIR"
            exit 0
            ;;
        --force) force=1 ;;
        -h | --help)
            sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument: $arg (usage: fetch-kernel.sh [--print-dir] [--force])" ;;
    esac
done

# Print LEN bytes of FILE at byte OFFSET as lowercase hex, no separators.
hex_at() {
    local file=$1 offset=$2 len=$3
    od -A n -v -t x1 -j "$offset" -N "$len" "$file" 2>/dev/null | tr -d ' \n'
}

# Little-endian unsigned integer of LEN (1, 2 or 4) bytes at OFFSET.
le_at() {
    local file=$1 offset=$2 len=$3 hex out="" i
    hex=$(hex_at "$file" "$offset" "$len")
    [[ ${#hex} -eq $((len * 2)) ]] || { echo -1; return; }
    for ((i = len - 1; i >= 0; i--)); do
        out+=${hex:$((i * 2)):2}
    done
    echo $((16#$out))
}

# True if FILE is an ELF64 little-endian x86_64 object (magic bytes only).
is_elf64_x86_64() {
    local file=$1
    [[ -s "$file" ]] || return 1
    # e_ident: 7f 45 4c 46, EI_CLASS=2 (64-bit), EI_DATA=1 (LE); e_machine at 18 = 0x3e.
    [[ "$(hex_at "$file" 0 6)" == "7f454c460201" ]] || return 1
    [[ "$(hex_at "$file" 18 2)" == "3e00" ]] || return 1
}

# True if FILE looks like an x86 bzImage ("HdrS" at 0x202).
is_bzimage() {
    local file=$1
    [[ -s "$file" ]] || return 1
    [[ "$(hex_at "$file" 0x202 4)" == "48647253" ]]
}

cache_valid() {
    is_bzimage "$BZIMAGE" && is_elf64_x86_64 "$VMLINUX" && [[ -s "$VERSION_FILE" ]]
}

# Report ELF details and the Xen PVH note (informational only).
report_vmlinux() {
    local file=$1 entry
    entry=$(od -A n -v -t x8 -j 24 -N 8 "$file" | tr -d ' \n')
    log "vmlinux: ELF64 x86_64, e_entry=$(printf '0x%x' "$((16#$entry))")"
    if command -v readelf >/dev/null 2>&1; then
        # XEN_ELFNOTE_PHYS32_ENTRY is note type 18 (0x12) in the "Xen" namespace.
        local desc
        desc=$(readelf -n "$file" 2>/dev/null |
            awk '/^ *Xen / && /0x00000012\)/ {getline; sub(/.*description data: */, ""); print; exit}')
        if [[ -n "$desc" ]]; then
            local -a b
            read -r -a b <<<"$desc"
            log "vmlinux: has Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY), entry=0x${b[3]}${b[2]}${b[1]}${b[0]}"
        else
            log "vmlinux: no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY) found"
        fi
    else
        log "vmlinux: readelf not available (binutils); PVH note not checked"
    fi
}

print_result() {
    echo "bzImage: $BZIMAGE"
    echo "vmlinux: $VMLINUX"
    echo "version: $(head -n1 "$VERSION_FILE") ($VERSION_FILE)"
    echo "$CACHE_DIR"
}

if [[ $force -eq 0 ]] && cache_valid; then
    print_result
    exit 0
fi

# ---------------------------------------------------------------------------
# Download.
# ---------------------------------------------------------------------------
command -v apt-get >/dev/null 2>&1 ||
    die "apt-get not found: this script needs a Debian-based host (apt-get download, dpkg-deb)"
command -v apt-cache >/dev/null 2>&1 || die "apt-cache not found (package apt)"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found (package dpkg)"

# Resolve the metapackage to the real image package of the candidate version.
resolve_pkg() {
    apt-cache depends --no-recommends --no-suggests "$META_PKG" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ {print $2; exit}'
}

real_pkg=$(resolve_pkg || true)
if [[ -z "$real_pkg" ]]; then
    if [[ $(id -u) -eq 0 ]]; then
        log "$META_PKG not known to apt; running apt-get update"
        apt-get update -q >&2 || die "apt-get update failed"
        real_pkg=$(resolve_pkg || true)
    else
        die "$META_PKG not found in apt's package lists: run 'sudo apt-get update' (needs Debian main in sources) and retry"
    fi
fi
[[ -n "$real_pkg" ]] || die "cannot resolve $META_PKG to a linux-image-*-cloud-amd64 package (is Debian main in apt sources?)"
log "resolved $META_PKG -> $real_pkg"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cryo-fetch-kernel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# _apt (the sandbox user) must be able to write the download directory.
chmod 0777 "$tmp"

(cd "$tmp" && apt-get download -q "$real_pkg" >&2) ||
    die "apt-get download $real_pkg failed (network or apt sources?)"
deb=$(find "$tmp" -maxdepth 1 -name "${real_pkg}_*.deb" -print -quit)
[[ -n "$deb" ]] || die "apt-get download produced no ${real_pkg}_*.deb"
version=$(dpkg-deb -f "$deb" Version)
[[ -n "$version" ]] || die "cannot read Version from $deb"
log "downloaded $(basename "$deb") (version $version)"

dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb -x $deb failed"
vmlinuz=$(find "$tmp/root/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null || true)
[[ -n "$vmlinuz" ]] || die "no /boot/vmlinuz-* in $deb"
is_bzimage "$vmlinuz" || die "$vmlinuz is not a bzImage (no HdrS signature)"

# ---------------------------------------------------------------------------
# Extract the ELF vmlinux from the bzImage.
# ---------------------------------------------------------------------------

# Name the compression of the data at OFFSET of FILE by its magic bytes.
compression_at() {
    local h
    h=$(hex_at "$1" "$2" 6)
    case "$h" in
        1f8b08*) echo gzip ;;
        fd377a585a00) echo xz ;;
        28b52ffd*) echo zstd ;;
        02214c18*) echo lz4 ;;
        425a68*) echo bzip2 ;;
        894c5a4f*) echo lzo ;;
        5d0000*) echo lzma ;;
        *) echo unknown ;;
    esac
}

# Decompressor command for a compression, as "tool|debian-package|args...".
decompressor_for() {
    case "$1" in
        gzip) echo "gzip|gzip|-dc" ;;
        xz) echo "xz|xz-utils|-dc --single-stream" ;;
        lzma) echo "xz|xz-utils|--format=lzma -dc" ;;
        zstd) echo "zstd|zstd|-dc -q" ;;
        lz4) echo "lz4|lz4|-dc" ;;
        bzip2) echo "bzip2|bzip2|-dc" ;;
        lzo) echo "lzop|lzop|-dc" ;;
        *) return 1 ;;
    esac
}

# Decompress LEN bytes at OFFSET of FILE with compression COMP into OUT.
# Returns non-zero unless OUT ends up an ELF64 x86_64 file.
try_decompress() {
    local file=$1 offset=$2 len=$3 comp=$4 out=$5 spec tool pkg args
    spec=$(decompressor_for "$comp") || return 1
    IFS='|' read -r tool pkg args <<<"$spec"
    command -v "$tool" >/dev/null 2>&1 ||
        die "the kernel payload is $comp-compressed but '$tool' is not installed (install Debian package '$pkg')"
    # shellcheck disable=SC2086
    tail -c +"$((offset + 1))" "$file" | head -c "$len" | "$tool" $args >"$out" 2>/dev/null || true
    is_elf64_x86_64 "$out"
}

setup_sects=$(le_at "$vmlinuz" 0x1f1 1)
[[ $setup_sects -eq 0 ]] && setup_sects=4
boot_proto=$(le_at "$vmlinuz" 0x206 2)
pm_start=$(((setup_sects + 1) * 512))
file_size=$(stat -c %s "$vmlinuz")
comp=""
if [[ $boot_proto -ge 0x208 ]]; then
    # Boot protocol 2.08+: payload_offset/payload_length locate the payload
    # exactly (relative to the protected-mode code).
    p_off=$(le_at "$vmlinuz" 0x248 4)
    p_len=$(le_at "$vmlinuz" 0x24c 4)
    abs_off=$((pm_start + p_off))
    comp=$(compression_at "$vmlinuz" "$abs_off")
    log "bzImage: boot protocol $(printf '%d.%02d' $((boot_proto >> 8)) $((boot_proto & 255))), payload at $abs_off, $p_len bytes, compression: $comp"
    if [[ $comp != unknown ]]; then
        # All formats but gzip carry the uncompressed size as a 4-byte
        # little-endian trailer (kernel's size_append); strip it first.
        ok=0
        if [[ $comp != gzip ]]; then
            try_decompress "$vmlinuz" "$abs_off" $((p_len - 4)) "$comp" "$tmp/vmlinux" && ok=1
            if [[ $ok -eq 1 ]]; then
                want=$(le_at "$vmlinuz" $((abs_off + p_len - 4)) 4)
                got=$(stat -c %s "$tmp/vmlinux")
                [[ $want -eq $got ]] || log "warning: vmlinux is $got bytes, size trailer says $want"
            fi
        fi
        if [[ $ok -eq 0 ]] && try_decompress "$vmlinuz" "$abs_off" "$p_len" "$comp" "$tmp/vmlinux"; then
            ok=1
        fi
        [[ $ok -eq 1 ]] || comp=""
    else
        comp=""
    fi
fi
if [[ -z "$comp" ]]; then
    # Fallback: scan the protected-mode part for known magics (like the
    # kernel's scripts/extract-vmlinux) and take the first that yields an ELF.
    log "payload not found via the boot header; scanning for compression magics"
    found=0
    for magic in '\x1f\x8b\x08' '\xfd\x37\x7a\x58\x5a\x00' '\x28\xb5\x2f\xfd' \
        '\x02\x21\x4c\x18' '\x42\x5a\x68' '\x89\x4c\x5a\x4f' '\x5d\x00\x00\x00'; do
        while IFS=: read -r pos _; do
            [[ -n "$pos" ]] || continue
            c=$(compression_at "$vmlinuz" "$pos")
            [[ $c != unknown ]] || continue
            if try_decompress "$vmlinuz" "$pos" $((file_size - pos)) "$c" "$tmp/vmlinux"; then
                comp=$c
                found=1
                break 2
            fi
        done < <(LC_ALL=C grep -obUaP "$magic" "$vmlinuz" 2>/dev/null | head -n 20 || true)
    done
    [[ $found -eq 1 ]] || die "could not extract an ELF vmlinux from $vmlinuz (unknown compression)"
    log "bzImage: payload compression (by scan): $comp"
fi

is_elf64_x86_64 "$tmp/vmlinux" || die "extracted vmlinux is not an ELF64 x86_64 file"
report_vmlinux "$tmp/vmlinux"

# ---------------------------------------------------------------------------
# Install into the cache atomically (rename within the cache dir).
# ---------------------------------------------------------------------------
mkdir -p "$CACHE_DIR"
cp "$vmlinuz" "$BZIMAGE.tmp.$$"
cp "$tmp/vmlinux" "$VMLINUX.tmp.$$"
echo "$version" >"$VERSION_FILE.tmp.$$"
mv -f "$BZIMAGE.tmp.$$" "$BZIMAGE"
mv -f "$VMLINUX.tmp.$$" "$VMLINUX"
mv -f "$VERSION_FILE.tmp.$$" "$VERSION_FILE"
log "cached $real_pkg $version (kernel $(basename "$vmlinuz" | sed 's/^vmlinuz-//'), $comp-compressed payload)"

print_result
