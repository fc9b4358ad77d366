/*
 * cryo test kernel: entry points, AP trampoline, interrupt stubs, static
 * GDT and boot page tables.
 *
 * Two entries converge on common64:
 *   linux64_entry (ELF e_entry): Linux 64-bit boot protocol, RSI = boot_params.
 *   pvh_entry32 (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, EBX = hvm_start_info.
 *
 * Ring-0 code here is executed by KVM's instruction emulator on PVM hosts:
 * plain integer instructions only.
 */

#define KSTACK_SIZE 8192
#define TRAMP_BASE 0x8000
#define MAX_CPUS 64
#define GDT_SIZE (6 * 8 + MAX_CPUS * 16)

#define SEL_CODE32 0x08
#define SEL_DATA 0x10
#define SEL_CODE64 0x18
#define SEL_UDATA 0x23
#define SEL_UCODE 0x2b

	.section .text.entry, "ax"
	.code64
	.globl linux64_entry
linux64_entry:
	/* Linux 64-bit boot protocol: long mode, paging on, RSI = boot_params. */
	cli
	cld
	xorl %edi, %edi			/* entry kind 0 = linux */
	jmp common64

	.code32
	.globl pvh_entry32
pvh_entry32:
	/* PVH: 32-bit flat protected mode, paging off, EBX = hvm_start_info. */
	cli
	cld
	movl %ebx, %esi
	lgdt gdtr
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl %cr4, %eax
	orl $0x20, %eax			/* PAE */
	movl %eax, %cr4
	movl $boot_pml4, %eax
	movl %eax, %cr3
	movl $0xC0000080, %ecx		/* EFER */
	rdmsr
	orl $0x100, %eax		/* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax		/* PG | PE */
	movl %eax, %cr0
	ljmp $SEL_CODE64, $pvh64

	.code64
pvh64:
	movl %esi, %esi			/* zero-extend start_info pointer */
	movl $1, %edi			/* entry kind 1 = pvh */
	/* fall through */

common64:
	/* rdi = entry kind, rsi = boot info pointer (physical). */
	lgdt gdtr(%rip)
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	leaq kstacks + KSTACK_SIZE(%rip), %rsp	/* cpu 0 ring-0 stack */
	pushq $SEL_CODE64
	leaq 1f(%rip), %rax
	pushq %rax
	lretq
1:
	movq $boot_pml4, %rax
	movq %rax, %cr3
	movq %cr4, %rax
	andq $~((1 << 21) | (1 << 20) | (1 << 7) | (1 << 2)), %rax	/* SMAP SMEP PGE TSD off */
	orq $0x20, %rax
	movq %rax, %cr4
	movq %rdi, %r12
	movq %rsi, %r13
	leaq __bss_start(%rip), %rdi
	leaq __bss_end(%rip), %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq
	movq %r12, %rdi
	movq %r13, %rsi
	call kmain
	jmp halt_forever

/*
 * Application processors arrive here from the trampoline, in 64-bit mode on
 * boot_pml4 with the kernel GDT loaded. Find our cpu index from the xAPIC ID
 * register without using a stack.
 */
	.globl ap_long_entry
ap_long_entry:
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	movl $0xfee00020, %eax		/* xAPIC ID register (the APs exist only with a LAPIC) */
	movl (%rax), %ebx
	shrl $24, %ebx
	xorl %ecx, %ecx
	leaq cpu_apic(%rip), %rsi
	movl cpu_count(%rip), %edx
2:	cmpl %edx, %ecx
	jae halt_forever
	movzbl (%rsi,%rcx), %eax
	cmpl %eax, %ebx
	je 3f
	incl %ecx
	jmp 2b
3:	movl %ecx, %edi
	leaq 1(%rcx), %rax
	shlq $13, %rax			/* * KSTACK_SIZE */
	leaq kstacks(%rip), %rsp
	addq %rax, %rsp
	call ap_main
	jmp halt_forever

	.globl halt_forever
halt_forever:
	cli
1:	hlt
	jmp 1b

/* enter_user(cpu, entry, ustack_top): iretq to ring 3 with IF=0, IOPL=0. */
	.globl enter_user
enter_user:
	movl $SEL_UDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	pushq $SEL_UDATA		/* ss */
	pushq %rdx			/* rsp */
	pushq $0x2			/* rflags: IF=0 IOPL=0 */
	pushq $SEL_UCODE		/* cs */
	pushq %rsi			/* rip */
	iretq

/* int 0x80 (DPL 3): ring 3 asks to halt this vCPU forever. */
	.globl isr_int80
isr_int80:
	jmp halt_forever

/* Exception stubs: frame = vector, error code, then the CPU's iret frame. */
.macro ISR_NOERR n
isr_\n:
	pushq $0
	pushq $\n
	jmp isr_common
.endm
.macro ISR_ERR n
isr_\n:
	pushq $\n
	jmp isr_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR 8
ISR_NOERR 9
ISR_ERR 10
ISR_ERR 11
ISR_ERR 12
ISR_ERR 13
ISR_ERR 14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR 17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR 21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR 29
ISR_ERR 30
ISR_NOERR 31

isr_common:
	cli
	cld
	movq %rsp, %rdi
	andq $-16, %rsp
	call exception_handler
	jmp halt_forever

/*
 * Real-mode AP trampoline, copied to TRAMP_BASE (SIPI vector 0x08).
 * CS = 0x0800, IP = 0. Real -> protected -> long mode on boot_pml4.
 */
	.code16
	.globl tramp_start
tramp_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl (tramp_gdtr - tramp_start)
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $SEL_CODE32, $(TRAMP_BASE + tramp32 - tramp_start)

	.code32
tramp32:
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %cr4, %eax
	orl $0x20, %eax
	movl %eax, %cr4
	movl $boot_pml4, %eax
	movl %eax, %cr3
	movl $0xC0000080, %ecx
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax
	movl %eax, %cr0
	ljmp $SEL_CODE64, $ap_long_entry

	.balign 8
tramp_gdtr:
	.word GDT_SIZE - 1
	.long gdt
	.long 0
	.globl tramp_end
tramp_end:

	.section .rodata
	.balign 8
	.globl isr_stubs
isr_stubs:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad isr_\n
	.endr

/* PVH entry note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), 4-byte desc. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4
	.long 4
	.long 18
	.asciz "Xen"
	.long pvh_entry32

	.section .data
	.balign 16
	.globl gdtr
gdtr:
	.word GDT_SIZE - 1
	.quad gdt

	.balign 16
	.globl gdt
gdt:
	.quad 0x0000000000000000	/* null */
	.quad 0x00CF9A000000FFFF	/* 0x08 kernel code 32 */
	.quad 0x00CF92000000FFFF	/* 0x10 kernel data */
	.quad 0x00AF9A000000FFFF	/* 0x18 kernel code 64 */
	.quad 0x00CFF2000000FFFF	/* 0x20 user data (DPL 3) */
	.quad 0x00AFFA000000FFFF	/* 0x28 user code 64 (DPL 3) */
	.fill MAX_CPUS * 2, 8, 0	/* 0x30: one 16-byte TSS descriptor per cpu */

/*
 * Page tables, used from the first instruction on (PVH, APs) and after
 * common64 (Linux entry). Identity map of the first 4 GiB with 2 MiB pages,
 * all user-accessible; 3-4 GiB uncached (MMIO: IOAPIC, LAPIC).
 * PML4[1] (virtual 512 GiB) is filled at run time with the pool window.
 */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl boot_pml4
boot_pml4:
	.quad boot_pdpt + 0x007
	.fill 511, 8, 0
boot_pdpt:
	.quad boot_pd + 0x0007
	.quad boot_pd + 0x1007
	.quad boot_pd + 0x2007
	.quad boot_pd + 0x3007
	.fill 508, 8, 0
boot_pd:
	.set i, 0
	.rept 1536
	.quad (i << 21) | 0x87		/* P RW US PS */
	.set i, i + 1
	.endr
	.rept 512
	.quad (i << 21) | 0x9f		/* P RW US PWT PCD PS */
	.set i, i + 1
	.endr
	.globl pool_pdpt
	.balign 4096
pool_pdpt:
	.fill 512, 8, 0

	.section .note.GNU-stack, "", @progbits
