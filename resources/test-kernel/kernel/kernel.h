/* cryo test kernel: shared definitions. */
#ifndef CRYO_KERNEL_H
#define CRYO_KERNEL_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned long usize;

#define NULL ((void *)0)
#define MAX_CPUS 64
#define KSTACK_SIZE 8192
#define USTACK_SIZE 16384
#define PAGE_SIZE 4096ULL
#define MIB (1024ULL * 1024ULL)
#define HUGE_2M (2ULL * MIB)
#define POOL_VA 0x8000000000ULL /* 512 GiB: PML4 slot 1 */
#define POOL_MAX (512ULL * 1024ULL * MIB)

#define MODE_VERIFY 0
#define MODE_FILL 1

#define TSC_SRC_CPUID_40000010 0
#define TSC_SRC_CPUID_15 1
#define TSC_SRC_CPUID_16 2
#define TSC_SRC_PIT 3
#define TSC_SRC_DEFAULT 4

/* Configuration shared between ring 0 (writer) and ring 3 (reader). */
struct config {
	u64 mem_mib;   /* cryo.mem: MiB per vCPU (0 = whole pool split evenly) */
	u64 rate;      /* cryo.rate: page rewrites per second per vCPU, 0 = unlimited */
	u64 hb_ms;     /* cryo.hb_ms */
	u64 mode;      /* MODE_VERIFY / MODE_FILL */
	u64 salt;      /* cryo.salt */
	u64 tsc_khz;
	u64 pool_bytes; /* bytes mapped at POOL_VA */
	u64 share_bytes;/* bytes per vCPU */
	u64 blk_slots; /* cryo.blk: 4 KiB slots the disk reader cycles (0 = off) */
	u64 blk_base;  /* physical (= virtual) address of the reader's area */
	u32 ncpus;
	u8 apic_ids[MAX_CPUS];
};

extern struct config cfg;
extern volatile u32 console_lock;

/* ---- low-level helpers (usable from ring 0 and ring 3) ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
/* MurmurHash3's 64-bit finalizer (the page and disk block patterns). */
static inline u64 fmix64(u64 k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdULL;
	k ^= k >> 33;
	k *= 0xc4ceb9fe1a85ec53ULL;
	k ^= k >> 33;
	return k;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u32 xchg32(volatile u32 *p, u32 v)
{
	__asm__ volatile("xchgl %0, %1" : "+r"(v), "+m"(*p) : : "memory");
	return v;
}

/* ---- line buffer formatting (lib.c) ---- */
struct line {
	char buf[256];
	u32 len;
};
void line_init(struct line *l);
void line_str(struct line *l, const char *s);
void line_strn(struct line *l, const char *s, u64 n);
void line_char(struct line *l, char c);
void line_dec(struct line *l, u64 v);
void line_hex(struct line *l, u64 v);   /* minimal lowercase hex, no prefix */
void line_hex16(struct line *l, u64 v); /* 16 digits, lowercase, no prefix */
/* Send the line plus "\n" to COM1 under the console lock. */
void line_send(struct line *l);
/* Same, but give up on the lock after a bounded wait (for panics). */
void line_send_force(struct line *l);

void serial_init(void);
void *kmemset(void *d, int c, u64 n);
void *kmemcpy(void *d, const void *s, u64 n);
int kmemcmp(const void *a, const void *b, u64 n);

/* ---- ring 3 (user.c, blk.c) ---- */
void user_main(u64 cpu) __attribute__((noreturn));
/* Pages of the disk reader's area for `slots` slots (rings, request, state). */
#define BLK_META_PAGES 3
#define BLK_MAX_SLOTS 960
int blk_init(void);
void blk_step(void);
void blk_report(void);

/* ---- assembly (boot.S) ---- */
void enter_user(u64 cpu, u64 entry, u64 ustack_top) __attribute__((noreturn));
void halt_forever(void) __attribute__((noreturn));
extern u64 isr_stubs[32];
extern void isr_int80(void);
extern u8 tramp_start[], tramp_end[];
extern u64 boot_pml4[512];
extern u8 gdt[];
extern u8 _end[];

#endif
