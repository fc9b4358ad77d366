/*
 * cryo test kernel: the ring-0 prologue (BSP and APs).
 *
 * On PVM hosts every instruction here runs in KVM's instruction emulator
 * (about 2 M instructions/s), so this code is short, uses integer
 * instructions only and does its bulk work with rep stosq.
 */
#include "kernel.h"

#define LAPIC_BASE 0xfee00000ULL
#define TRAMP_BASE 0x8000ULL
#define SEL_CODE64 0x18
#define SEL_TSS0 0x30
#define MAX_MEMMAP 128
#define CMDLINE_MAX 2048

struct config cfg;
u32 cpu_count;
u8 cpu_apic[MAX_CPUS];
volatile u32 ap_alive[MAX_CPUS];

u8 kstacks[MAX_CPUS][KSTACK_SIZE] __attribute__((section(".bss.noinit"), aligned(4096)));
u8 ustacks[MAX_CPUS][USTACK_SIZE] __attribute__((section(".bss.noinit"), aligned(4096)));

/*
 * All TSSs share one I/O permission bitmap: TSS i sits at offset i*128 and
 * its I/O map base points at the common bitmap at offset MAX_CPUS*128.
 */
struct tss_block {
	u8 tss[MAX_CPUS][128];
	u8 iomap[8192];
	u8 term[8]; /* 0xff terminator (+ padding) */
};
static struct tss_block tssb __attribute__((section(".bss.noinit"), aligned(4096)));
static u64 idt[512] __attribute__((aligned(4096)));

extern u64 pool_pdpt[512];
extern u8 gdtr[];

static char cmdline[CMDLINE_MAX];
struct mrange {
	u64 addr, size;
	u32 type;
};
static struct mrange memmap[MAX_MEMMAP];
static u32 nmem;
static u64 excl_start, excl_end; /* initrd / first PVH module */
static u64 rsdp_hint;
static u32 tsc_source;

static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)a; }

static void fill64(void *dst, u64 val, u64 count)
{
	__asm__ volatile("rep stosq" : "+D"(dst), "+c"(count) : "a"(val) : "memory");
}

static void copy64(void *dst, const void *src, u64 count)
{
	__asm__ volatile("rep movsq" : "+D"(dst), "+S"(src), "+c"(count) : : "memory");
}

static void say(const char *s)
{
	struct line l;
	line_init(&l);
	line_str(&l, s);
	line_send(&l);
}

static u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

/*
 * This CPU's APIC ID: the xAPIC ID register when the LAPIC is enabled in
 * xAPIC mode at the default base (the ID IPIs are addressed to), else the
 * initial APIC ID from CPUID.1:EBX[31:24].
 */
static u32 my_apic_id(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	if (d & (1u << 9)) {
		u64 base = rdmsr(0x1b);
		if ((base & (1u << 11)) && !(base & (1u << 10)) &&
		    (base & 0xfffffffffffff000ULL) == LAPIC_BASE)
			return rd32(LAPIC_BASE + 0x20) >> 24;
	}
	return b >> 24;
}

static u32 apic_to_cpu(u32 apic)
{
	for (u32 i = 0; i < cpu_count && i < MAX_CPUS; i++)
		if (cpu_apic[i] == apic)
			return i;
	return 0xff;
}

/* ------------------------------------------------------------------ */
/* Exceptions                                                          */

void exception_handler(u64 *f)
{
	u64 cr2;
	struct line l;
	/*
	 * f: vector, error code, rip, cs, rflags, rsp, ss.
	 * A ring-3 "int $0x80" normally arrives through the DPL-3 gate
	 * (isr_int80). On PVM hosts the user-mode int 0x80 is delivered as #UD
	 * (or could be #GP) instead: recognise the instruction and halt quietly.
	 */
	if ((f[0] == 6 || f[0] == 13) && (f[3] & 3) == 3 && f[2] < 0x100000000ULL &&
	    rd16(f[2]) == 0x80cd)
		halt_forever();
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	line_init(&l);
	line_str(&l, "PANIC cpu=");
	line_dec(&l, apic_to_cpu(my_apic_id()));
	line_str(&l, " vector=");
	line_dec(&l, f[0]);
	line_str(&l, " err=0x");
	line_hex(&l, f[1]);
	line_str(&l, " rip=0x");
	line_hex(&l, f[2]);
	line_str(&l, " cr2=0x");
	line_hex(&l, cr2);
	line_send_force(&l);
	halt_forever();
}

static void set_gate(u32 vec, u64 handler, u32 dpl)
{
	idt[vec * 2] = (handler & 0xffff) | ((u64)SEL_CODE64 << 16) |
		       ((u64)(0x8e | (dpl << 5)) << 40) | (((handler >> 16) & 0xffff) << 48);
	idt[vec * 2 + 1] = handler >> 32;
}

static void load_idt(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) d = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(d));
}

/* ------------------------------------------------------------------ */
/* Boot information                                                    */

static void copy_cmdline(u64 addr)
{
	u32 i = 0;
	if (addr)
		for (; i < CMDLINE_MAX - 1; i++) {
			char c = (char)rd8(addr + i);
			if (!c)
				break;
			cmdline[i] = c;
		}
	cmdline[i] = 0;
}

static void add_range(u64 addr, u64 size, u32 type)
{
	if (nmem < MAX_MEMMAP) {
		memmap[nmem].addr = addr;
		memmap[nmem].size = size;
		memmap[nmem].type = type;
		nmem++;
	}
}

static void parse_linux(u64 bp)
{
	copy_cmdline(rd32(bp + 0x228));
	u32 n = rd8(bp + 0x1e8);
	if (n > 128)
		n = 128;
	for (u32 i = 0; i < n; i++) {
		u64 e = bp + 0x2d0 + i * 20;
		add_range(rd64(e), rd64(e + 8), rd32(e + 16));
	}
	rsdp_hint = rd64(bp + 0x070);
	u64 rd = rd32(bp + 0x218), rs = rd32(bp + 0x21c);
	if (rd && rs) {
		excl_start = rd;
		excl_end = rd + rs;
	}
}

static void parse_pvh(u64 si)
{
	if (rd32(si) != 0x336ec578) {
		say("WARN bad hvm_start_info magic");
		return;
	}
	u64 cl = rd64(si + 24);
	copy_cmdline(cl < 0x100000000ULL ? cl : 0);
	rsdp_hint = rd64(si + 32);
	if (rd32(si + 4) >= 1) {
		u64 mm = rd64(si + 40);
		u32 n = rd32(si + 48);
		if (n > MAX_MEMMAP)
			n = MAX_MEMMAP;
		if (mm && mm < 0x100000000ULL)
			for (u32 i = 0; i < n; i++) {
				u64 e = mm + i * 24;
				add_range(rd64(e), rd64(e + 8), rd32(e + 16));
			}
	}
	u32 nmod = rd32(si + 12);
	u64 ml = rd64(si + 16);
	if (nmod && ml && ml < 0x100000000ULL) {
		u64 a = rd64(ml), s = rd64(ml + 8);
		if (s) {
			excl_start = a;
			excl_end = a + s;
		}
	}
}

/* ------------------------------------------------------------------ */
/* Command line                                                        */

static int starts_with(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static u64 parse_u64(const char *s)
{
	u64 v = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		s += 2;
		for (;; s++) {
			char c = *s;
			u64 d;
			if (c >= '0' && c <= '9')
				d = (u64)(c - '0');
			else if (c >= 'a' && c <= 'f')
				d = (u64)(c - 'a' + 10);
			else if (c >= 'A' && c <= 'F')
				d = (u64)(c - 'A' + 10);
			else
				break;
			v = v * 16 + d;
		}
	} else {
		for (; *s >= '0' && *s <= '9'; s++)
			v = v * 10 + (u64)(*s - '0');
	}
	return v;
}

static void parse_options(void)
{
	cfg.mem_mib = 16;
	cfg.rate = 20000;
	cfg.hb_ms = 1000;
	cfg.mode = MODE_VERIFY;
	cfg.salt = 0x5eed;
	const char *s = cmdline;
	while (*s) {
		while (*s == ' ' || *s == '\t' || *s == '\n')
			s++;
		if (!*s)
			break;
		if (starts_with(s, "cryo.mem="))
			cfg.mem_mib = parse_u64(s + 9);
		else if (starts_with(s, "cryo.rate="))
			cfg.rate = parse_u64(s + 10);
		else if (starts_with(s, "cryo.hb_ms="))
			cfg.hb_ms = parse_u64(s + 11);
		else if (starts_with(s, "cryo.salt="))
			cfg.salt = parse_u64(s + 10);
		else if (starts_with(s, "cryo.blk="))
			cfg.blk_slots = parse_u64(s + 9);
		else if (starts_with(s, "cryo.mode=fill"))
			cfg.mode = MODE_FILL;
		else if (starts_with(s, "cryo.mode=verify"))
			cfg.mode = MODE_VERIFY;
		while (*s && *s != ' ' && *s != '\t' && *s != '\n')
			s++;
	}
	if (cfg.hb_ms == 0)
		cfg.hb_ms = 1000;
	if (cfg.blk_slots > BLK_MAX_SLOTS)
		cfg.blk_slots = BLK_MAX_SLOTS;
}

/* ------------------------------------------------------------------ */
/* TSC frequency                                                       */

static u64 pit_calibrate(void)
{
	const u32 latch = 11932; /* 10 ms at 1.193182 MHz */
	u8 v = inb(0x61);
	outb(0x61, (u8)((v & ~0x02) | 0x01)); /* gate on, speaker off */
	outb(0x43, 0xb0);		      /* ch 2, lo/hi, mode 0, binary */
	outb(0x42, latch & 0xff);
	outb(0x42, latch >> 8);
	u64 t0 = rdtsc();
	u64 t1 = t0;
	u32 polls = 0;
	for (;;) {
		t1 = rdtsc();
		if (inb(0x61) & 0x20)
			break;
		polls++;
		/* give up after ~5e8 cycles (0.05 s even at 10 GHz) */
		if (t1 - t0 > 500000000ULL)
			return 0;
	}
	outb(0x61, v);
	if (polls < 2)
		return 0; /* no PIT: bit 5 read back set at once */
	u64 khz = (t1 - t0) / 10;
	if (khz < 100000 || khz > 10000000)
		return 0;
	return khz;
}

static u64 tsc_khz_detect(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	if (c & (1u << 31)) { /* hypervisor present */
		cpuid(0x40000000, 0, &a, &b, &c, &d);
		if (a >= 0x40000010 && a < 0x40010000) {
			cpuid(0x40000010, 0, &a, &b, &c, &d);
			if (a) {
				tsc_source = TSC_SRC_CPUID_40000010;
				return a;
			}
		}
	}
	u32 max;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c) {
			tsc_source = TSC_SRC_CPUID_15;
			return (u64)c * b / a / 1000;
		}
	}
	if (max >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d);
		if (a & 0xffff) {
			tsc_source = TSC_SRC_CPUID_16;
			return (u64)(a & 0xffff) * 1000;
		}
	}
	u64 k = pit_calibrate();
	if (k) {
		tsc_source = TSC_SRC_PIT;
		return k;
	}
	tsc_source = TSC_SRC_DEFAULT;
	return 2000000;
}

static void delay_us(u64 us)
{
	u64 t0 = rdtsc(), ticks = cfg.tsc_khz * us / 1000;
	while (rdtsc() - t0 < ticks)
		cpu_relax();
}

/* ------------------------------------------------------------------ */
/* CPU discovery: ACPI MADT, else MP table, else one CPU                */

static void add_cpu(u32 apic)
{
	if (apic > 0xff)
		return;
	for (u32 i = 0; i < cpu_count; i++)
		if (cpu_apic[i] == apic)
			return;
	if (cpu_count < MAX_CPUS)
		cpu_apic[cpu_count++] = (u8)apic;
}

static int sig_eq(u64 a, const char *s, u32 n)
{
	for (u32 i = 0; i < n; i++)
		if (rd8(a + i) != (u8)s[i])
			return 0;
	return 1;
}

static u64 scan_sig(const char *sig, u32 n)
{
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (sig_eq(a, sig, n))
			return a;
	return 0;
}

static int parse_madt(u64 madt)
{
	u32 len = rd32(madt + 4);
	if (len < 44 || len > 65536)
		return 0;
	int found = 0;
	for (u64 off = 44; off + 2 <= len;) {
		u64 e = madt + off;
		u8 type = rd8(e), elen = rd8(e + 1);
		if (elen < 2)
			break;
		if (type == 0 && elen >= 8 && (rd32(e + 4) & 1)) {
			add_cpu(rd8(e + 3));
			found = 1;
		}
		off += elen;
	}
	return found;
}

static int acpi_cpus(void)
{
	u64 rsdp = rsdp_hint;
	if (!rsdp || rsdp >= 0x100000000ULL || !sig_eq(rsdp, "RSD PTR ", 8))
		rsdp = scan_sig("RSD PTR ", 8);
	if (!rsdp)
		return 0;
	u64 sdt = 0;
	u32 esz = 4;
	if (rd8(rsdp + 15) >= 2) {
		u64 x = rd64(rsdp + 24);
		if (x && x < 0x100000000ULL && sig_eq(x, "XSDT", 4)) {
			sdt = x;
			esz = 8;
		}
	}
	if (!sdt) {
		u64 r = rd32(rsdp + 16);
		if (r && sig_eq(r, "RSDT", 4))
			sdt = r;
	}
	if (!sdt)
		return 0;
	u32 len = rd32(sdt + 4);
	if (len < 36 || len > 4096)
		return 0;
	u32 n = (len - 36) / esz;
	for (u32 i = 0; i < n; i++) {
		u64 t = esz == 8 ? rd64(sdt + 36 + i * 8) : rd32(sdt + 36 + i * 4);
		if (!t || t >= 0x100000000ULL)
			continue;
		if (sig_eq(t, "APIC", 4))
			return parse_madt(t);
	}
	return 0;
}

static int mp_cpus(void)
{
	u64 mp = scan_sig("_MP_", 4);
	if (!mp)
		return 0;
	u64 ct = rd32(mp + 4);
	if (!ct || ct >= 0x100000000ULL || !sig_eq(ct, "PCMP", 4))
		return 0;
	u32 len = rd16(ct + 4), count = rd16(ct + 34);
	int found = 0;
	u64 off = 44;
	for (u32 i = 0; i < count && off < len && i < 1024; i++) {
		u8 type = rd8(ct + off);
		if (type == 0) {
			if (rd8(ct + off + 3) & 1) {
				add_cpu(rd8(ct + off + 1));
				found = 1;
			}
			off += 20;
		} else if (type <= 4) {
			off += 8;
		} else {
			break;
		}
	}
	return found;
}

static void find_cpus(void)
{
	u32 bsp = my_apic_id();
	cpu_count = 0;
	add_cpu(bsp); /* the BSP is always cpu 0 */
	if (!acpi_cpus())
		mp_cpus();
}

/* ------------------------------------------------------------------ */
/* Pool window at POOL_VA                                               */

static u64 align_up(u64 v, u64 a) { return (v + a - 1) & ~(a - 1); }
static u64 align_down(u64 v, u64 a) { return v & ~(a - 1); }

static u64 *pool_pd_base; /* PD pages, right after the image */
static u64 pool_idx;      /* 2 MiB pages mapped so far */
static u64 pool_pd_max;

static void map_piece(u64 s, u64 e)
{
	s = align_up(s, HUGE_2M);
	e = align_down(e, HUGE_2M);
	for (; s < e; s += HUGE_2M) {
		if (pool_idx >= pool_pd_max * 512)
			return;
		pool_pd_base[pool_idx] = s | 0x87; /* P RW US PS */
		pool_idx++;
	}
}

static void build_pool(void)
{
	u64 ram = 0;
	for (u32 i = 0; i < nmem; i++)
		if (memmap[i].type == 1)
			ram += memmap[i].size;
	u64 max_pds = ram / (1024 * MIB) + nmem + 1;
	if (max_pds > 512)
		max_pds = 512;
	pool_pd_base = (u64 *)align_up((u64)_end, PAGE_SIZE);
	pool_pd_max = max_pds;
	u64 lo = align_up((u64)pool_pd_base + max_pds * PAGE_SIZE, HUGE_2M);
	if (cfg.blk_slots) {
		/* The disk reader's area: identity-mapped RAM below the pool. */
		cfg.blk_base = lo;
		lo = align_up(lo + (BLK_META_PAGES + cfg.blk_slots) * PAGE_SIZE, HUGE_2M);
	}
	pool_idx = 0;
	for (u32 i = 0; i < nmem; i++) {
		if (memmap[i].type != 1)
			continue;
		u64 s = memmap[i].addr, e = memmap[i].addr + memmap[i].size;
		if (s < lo)
			s = lo;
		if (e <= s)
			continue;
		if (excl_end > s && excl_start < e) {
			map_piece(s, excl_start > s ? excl_start : s);
			map_piece(excl_end < e ? excl_end : e, e);
		} else {
			map_piece(s, e);
		}
	}
	u64 npd = (pool_idx + 511) / 512;
	if (pool_idx % 512)
		fill64(pool_pd_base + pool_idx, 0, 512 - pool_idx % 512);
	fill64(pool_pdpt, 0, 512);
	for (u64 i = 0; i < npd; i++)
		pool_pdpt[i] = ((u64)pool_pd_base + i * PAGE_SIZE) | 0x07;
	boot_pml4[1] = (u64)pool_pdpt | 0x07;
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
	cfg.pool_bytes = pool_idx * HUGE_2M;
}

/* ------------------------------------------------------------------ */
/* GDT / TSS                                                           */

static void setup_tss(void)
{
	fill64(tssb.iomap, ~0ULL, sizeof(tssb.iomap) / 8);
	fill64(tssb.term, ~0ULL, 1);
	tssb.iomap[0x3f8 / 8] = 0; /* ports 0x3f8-0x3ff */
	u64 *g = (u64 *)(gdt + SEL_TSS0);
	for (u32 i = 0; i < cpu_count; i++) {
		u8 *t = tssb.tss[i];
		fill64(t, 0, 16);
		u64 rsp0 = (u64)&kstacks[i][KSTACK_SIZE];
		*(u64 *)(t + 4) = rsp0;
		u32 iobase = (u32)((u64)tssb.iomap - (u64)t);
		*(u16 *)(t + 102) = (u16)iobase;
		u64 base = (u64)t;
		u64 limit = iobase + sizeof(tssb.iomap); /* includes the 0xff byte */
		g[i * 2] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
			   (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
		g[i * 2 + 1] = base >> 32;
	}
}

static void load_tss(u32 cpu)
{
	u16 sel = (u16)(SEL_TSS0 + cpu * 16);
	__asm__ volatile("ltr %0" : : "r"(sel));
}

/* ------------------------------------------------------------------ */
/* Ring 3 entry                                                        */

static void go_user(u32 cpu)
{
	u64 top = (u64)&ustacks[cpu][USTACK_SIZE] - 8;
	enter_user(cpu, (u64)user_main, top);
}

void ap_main(u64 cpu)
{
	load_idt();
	load_tss((u32)cpu);
	ap_alive[cpu] = 1;
	go_user((u32)cpu);
}

/* ------------------------------------------------------------------ */
/* AP startup                                                          */

static void lapic_write(u32 off, u32 v) { *(volatile u32 *)(LAPIC_BASE + off) = v; }
static u32 lapic_read(u32 off) { return *(volatile u32 *)(LAPIC_BASE + off); }

static void send_ipi(u32 apic, u32 lo)
{
	lapic_write(0x310, apic << 24);
	lapic_write(0x300, lo);
	for (u32 i = 0; i < 1000 && (lapic_read(0x300) & (1u << 12)); i++)
		cpu_relax();
}

static void start_aps(void)
{
	if (cpu_count < 2)
		return;
	copy64((void *)TRAMP_BASE, tramp_start, (u64)(tramp_end - tramp_start + 7) / 8);
	lapic_write(0xf0, lapic_read(0xf0) | 0x1ff); /* software enable, spurious 0xff */
	for (u32 i = 1; i < cpu_count; i++)
		send_ipi(cpu_apic[i], 0x4500); /* INIT */
	delay_us(1000);
	for (u32 i = 1; i < cpu_count; i++)
		send_ipi(cpu_apic[i], 0x4600 | (TRAMP_BASE >> 12)); /* SIPI */
	delay_us(200);
	for (u32 i = 1; i < cpu_count; i++)
		if (!ap_alive[i])
			send_ipi(cpu_apic[i], 0x4600 | (TRAMP_BASE >> 12));
	u64 t0 = rdtsc(), limit = cfg.tsc_khz * 1000; /* 1 s */
	for (;;) {
		u32 done = 1;
		for (u32 i = 1; i < cpu_count; i++)
			if (!ap_alive[i])
				done = 0;
		if (done || rdtsc() - t0 > limit)
			break;
		delay_us(100);
	}
	for (u32 i = 1; i < cpu_count; i++)
		if (!ap_alive[i]) {
			struct line l;
			line_init(&l);
			line_str(&l, "AP-TIMEOUT apic=");
			line_dec(&l, cpu_apic[i]);
			line_send(&l);
		}
}

/* ------------------------------------------------------------------ */

static const char *tsc_source_name(void)
{
	switch (tsc_source) {
	case TSC_SRC_CPUID_40000010:
		return "cpuid-40000010";
	case TSC_SRC_CPUID_15:
		return "cpuid-15";
	case TSC_SRC_CPUID_16:
		return "cpuid-16";
	case TSC_SRC_PIT:
		return "pit";
	default:
		return "default";
	}
}

void kmain(u64 kind, u64 info)
{
	struct line l;

	serial_init();
	if (kind == 1)
		parse_pvh(info);
	else
		parse_linux(info);
	parse_options();

	for (u32 i = 0; i < 32; i++)
		set_gate(i, isr_stubs[i], 0);
	set_gate(0x80, (u64)isr_int80, 3);
	load_idt();

	line_init(&l);
	line_str(&l, "cryo-test-kernel 0.1 entry=");
	line_str(&l, kind == 1 ? "pvh" : "linux");
	line_str(&l, " cmdline=\"");
	line_str(&l, cmdline);
	line_str(&l, "\"");
	line_send(&l);

	cfg.tsc_khz = tsc_khz_detect();
	find_cpus();
	cfg.ncpus = cpu_count;
	for (u32 i = 0; i < cpu_count; i++)
		cfg.apic_ids[i] = cpu_apic[i];

	line_init(&l);
	line_str(&l, "cpus=");
	line_dec(&l, cpu_count);
	line_str(&l, " apic_ids=");
	for (u32 i = 0; i < cpu_count; i++) {
		if (i)
			line_char(&l, ',');
		line_dec(&l, cpu_apic[i]);
	}
	line_str(&l, " tsc_khz=");
	line_dec(&l, cfg.tsc_khz);
	line_str(&l, " tsc_source=");
	line_str(&l, tsc_source_name());
	line_send(&l);

	build_pool();
	u64 pool_mib = cfg.pool_bytes / MIB;
	u64 share_mib = cfg.mem_mib ? cfg.mem_mib : pool_mib / cpu_count;
	cfg.share_bytes = share_mib * MIB;

	line_init(&l);
	line_str(&l, "pool_mib=");
	line_dec(&l, pool_mib);
	line_str(&l, " share_mib=");
	line_dec(&l, share_mib);
	line_send(&l);

	if (share_mib == 0 || share_mib * cpu_count > pool_mib) {
		line_init(&l);
		line_str(&l, "ERROR not enough memory: need ");
		line_dec(&l, (share_mib ? share_mib : 1) * cpu_count);
		line_str(&l, " MiB have ");
		line_dec(&l, pool_mib);
		line_str(&l, " MiB");
		line_send(&l);
		halt_forever();
	}

	setup_tss();
	load_tss(0);
	start_aps();
	go_user(0);
}
