/*
 * mini-vmm: boots the cryo test kernel through its Linux 64-bit boot
 * protocol entry (e_entry) on /dev/kvm, with one vCPU and no irqchip, and
 * copies COM1 output to stdout. A check for that entry while cryo itself is
 * being written; not part of the build.
 *
 *   gcc -O2 -o /tmp/mini-vmm resources/test-kernel/tools/mini-vmm.c
 *   /tmp/mini-vmm "$(cargo run -q -p cryo-test-kernel)" "cryo.mem=16 cryo.hb_ms=500" 10 [mem_mib] [tsc_leaf]
 *
 * Exits after the given number of seconds, or when the vCPU halts.
 * tsc_leaf=1 (default) sets CPUID 0x40000010 to the vCPU's TSC kHz.
 */
#include <elf.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void die(const char *m)
{
	perror(m);
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s ELF CMDLINE SECONDS [MEM_MIB] [TSC_LEAF]\n", argv[0]);
		return 2;
	}
	const char *cmdline = argv[2];
	int secs = atoi(argv[3]);
	uint64_t mem_size = (argc > 4 ? strtoull(argv[4], 0, 0) : 256) << 20;
	int tsc_leaf = argc > 5 ? atoi(argv[5]) : 1;

	int fd = open(argv[1], O_RDONLY);
	if (fd < 0)
		die("open elf");
	struct stat stb;
	fstat(fd, &stb);
	uint8_t *img = mmap(0, stb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (img == MAP_FAILED)
		die("mmap elf");
	Elf64_Ehdr *eh = (Elf64_Ehdr *)img;

	int kvm = open("/dev/kvm", O_RDWR);
	if (kvm < 0)
		die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	uint8_t *mem = mmap(0, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap mem");
	struct kvm_userspace_memory_region reg = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uint64_t)mem
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &reg) < 0)
		die("KVM_SET_USER_MEMORY_REGION");

	/* Load PT_LOAD segments at p_paddr. */
	for (int i = 0; i < eh->e_phnum; i++) {
		Elf64_Phdr *ph = (Elf64_Phdr *)(img + eh->e_phoff + i * eh->e_phentsize);
		if (ph->p_type != PT_LOAD)
			continue;
		if (ph->p_paddr + ph->p_memsz > mem_size) {
			fprintf(stderr, "segment beyond memory\n");
			return 2;
		}
		memcpy(mem + ph->p_paddr, img + ph->p_offset, ph->p_filesz);
	}

	/* boot_params at 0x7000, command line at 0x20000. */
	uint8_t *bp = mem + 0x7000;
	strcpy((char *)mem + 0x20000, cmdline);
	*(uint32_t *)(bp + 0x228) = 0x20000;
	struct __attribute__((packed)) e820 {
		uint64_t addr, size;
		uint32_t type;
	} *e = (struct e820 *)(bp + 0x2d0);
	e[0] = (struct e820){ 0, 0x9fc00, 1 };
	e[1] = (struct e820){ 0x9fc00, 0x100000 - 0x9fc00, 2 };
	e[2] = (struct e820){ 0x100000, mem_size - 0x100000, 1 };
	bp[0x1e8] = 3;

	/* Page tables at 0x9000 (1 GiB identity, 2 MiB pages), GDT at 0x500. */
	uint64_t *pml4 = (uint64_t *)(mem + 0x9000), *pdpt = (uint64_t *)(mem + 0xa000),
		 *pd = (uint64_t *)(mem + 0xb000);
	pml4[0] = 0xa000 | 3;
	pdpt[0] = 0xb000 | 3;
	for (int i = 0; i < 512; i++)
		pd[i] = ((uint64_t)i << 21) | 0x83;
	uint64_t *gdt = (uint64_t *)(mem + 0x500);
	gdt[0] = 0;
	gdt[1] = 0;
	gdt[2] = 0x00af9b000000ffffULL; /* 0x10 code64 */
	gdt[3] = 0x00cf93000000ffffULL; /* 0x18 data */

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_sz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(0, run_sz, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap run");

	/* CPUID: supported leaves, plus 0x40000010 = TSC kHz. */
	int nent = 256;
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + (nent + 1) * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = nent;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	long tsc_khz = ioctl(vcpu, KVM_GET_TSC_KHZ, 0);
	if (tsc_leaf) {
		for (unsigned i = 0; i < cpuid->nent; i++)
			if (cpuid->entries[i].function == 0x40000000)
				cpuid->entries[i].eax = 0x40000010;
		struct kvm_cpuid_entry2 *x = &cpuid->entries[cpuid->nent++];
		memset(x, 0, sizeof(*x));
		x->function = 0x40000010;
		x->eax = (uint32_t)tsc_khz;
	}
	if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");

	struct kvm_sregs sr;
	if (ioctl(vcpu, KVM_GET_SREGS, &sr) < 0)
		die("KVM_GET_SREGS");
	struct kvm_segment cs = { .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 11, .present = 1,
				  .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1 };
	struct kvm_segment ds = cs;
	ds.selector = 0x18;
	ds.type = 3;
	ds.l = 0;
	ds.db = 1;
	sr.cs = cs;
	sr.ds = sr.es = sr.fs = sr.gs = sr.ss = ds;
	sr.gdt.base = 0x500;
	sr.gdt.limit = 31;
	sr.cr3 = 0x9000;
	sr.cr4 = 0x20;
	sr.cr0 = 0x80050033;
	sr.efer = 0x500;
	if (ioctl(vcpu, KVM_SET_SREGS, &sr) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs r;
	memset(&r, 0, sizeof(r));
	r.rip = eh->e_entry;
	r.rsi = 0x7000;
	r.rsp = 0x8ff0;
	r.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &r) < 0)
		die("KVM_SET_REGS");
	fprintf(stderr, "mini-vmm: entry=0x%llx mem=%llu MiB tsc_khz=%ld\n", (unsigned long long)eh->e_entry,
		(unsigned long long)(mem_size >> 20), tsc_khz);

	time_t end = time(0) + secs;
	alarm(secs + 1);
	while (time(0) < end) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			die("KVM_RUN");
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			uint8_t *d = (uint8_t *)run + run->io.data_offset;
			for (unsigned k = 0; k < run->io.count; k++, d += run->io.size) {
				if (run->io.direction == KVM_EXIT_IO_OUT) {
					if (run->io.port == 0x3f8)
						fputc(*d, stdout);
				} else {
					*d = run->io.port == 0x3fd ? 0x60 : (run->io.port == 0x61 ? 0 : 0xff);
				}
			}
			if (run->io.port == 0x3f8)
				fflush(stdout);
			break;
		}
		case KVM_EXIT_HLT:
			fprintf(stderr, "mini-vmm: vCPU halted\n");
			return 0;
		case KVM_EXIT_MMIO:
			break;
		default:
			ioctl(vcpu, KVM_GET_REGS, &r);
			fprintf(stderr, "mini-vmm: exit reason %u (suberror %u) rip=0x%llx\n", run->exit_reason,
				run->internal.suberror, (unsigned long long)r.rip);
			return 1;
		}
	}
	fprintf(stderr, "mini-vmm: time up\n");
	return 0;
}
