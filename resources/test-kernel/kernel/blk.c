/*
 * cryo test kernel: the disk reader (cryo.blk=<slots>), ring 3, vCPU 0.
 *
 * A polled virtio-blk driver on the first virtio-mmio device (one queue,
 * one request in flight, no interrupts) reads 4 KiB blocks of the disk into
 * a ring of slots, each pass putting other blocks into each slot, and keeps
 * re-verifying every slot against the block it last read there. The device
 * writes the slots, the status byte and the used ring; the vCPU only writes
 * its table of which block each slot holds. So a copy of guest memory that
 * missed a device write (a page the VMM wrote but no dirty log reported)
 * shows up, once restored, as a slot holding another pass's block:
 * "MISMATCH blk ...".
 *
 * Disk block b (4 KiB) holds the words blk_word(b, j), j = 0..511.
 * Everything lives in the reader's area (cfg.blk_base, identity-mapped):
 * rings, request, state and slots, so a restored VM carries on.
 */
#include "kernel.h"

#define MMIO 0xd0000000ULL /* virtio-mmio slot 0 */
#define QSIZE 4
#define NONE 0xffffffffu
#define BLK_MAGIC 0x63727966424c4b31ULL /* "cryfBLK1" */
#define MISMATCH_LINES 16
#define VERIFY_PER_STEP 2

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct blk_state {
	u64 magic;
	u64 blocks;	/* disk size in 4 KiB blocks */
	u64 inflight;	/* a request was published and not yet used */
	u64 slot;	/* the slot being read */
	u64 block;	/* the block being read */
	u64 pass;
	u64 avail_idx;
	u64 used_idx;	/* used entries consumed */
	u64 reads;
	u64 verified;
	u64 errors;
	u64 vcursor;
	u64 lines;
	u64 pad[3];
	u32 slot_block[]; /* the block each slot holds, NONE while being read */
};

/* The area: page 0 rings, page 1 request, page 2 state, then the slots. */
#define DESC_OFF 0x0
#define AVAIL_OFF 0x100
#define USED_OFF 0x800
#define REQ_OFF 0x1000
#define STATUS_OFF 0x1010
#define STATE_OFF 0x2000
#define SLOTS_OFF (BLK_META_PAGES * PAGE_SIZE)

static inline volatile u32 *reg(u64 off) { return (volatile u32 *)(MMIO + off); }
static inline u64 area(u64 off) { return cfg.blk_base + off; }
static inline struct blk_state *state(void) { return (struct blk_state *)area(STATE_OFF); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* Word j of disk block b. */
static inline u64 blk_word(u64 b, u64 j) { return fmix64(((b << 9) | j) ^ 0xb10c5eedULL); }

static void blk_error(const char *what, u64 v)
{
	struct line l;
	line_init(&l);
	line_str(&l, "ERROR blk ");
	line_str(&l, what);
	line_dec(&l, v);
	line_send(&l);
}

/* Checks slot s against block b; counts and reports a mismatch. */
static void check_slot(struct blk_state *st, u64 s, u64 b, const char *when)
{
	volatile u64 *p = (volatile u64 *)area(SLOTS_OFF + s * PAGE_SIZE);
	st->verified++;
	for (u64 j = 0; j < 512; j++) {
		u64 want = blk_word(b, j), got = p[j];
		if (got == want)
			continue;
		st->errors++;
		if (st->lines++ < MISMATCH_LINES) {
			struct line l;
			line_init(&l);
			line_str(&l, "MISMATCH blk slot=");
			line_dec(&l, s);
			line_str(&l, " block=");
			line_dec(&l, b);
			line_str(&l, " word=");
			line_dec(&l, j);
			line_str(&l, when);
			line_str(&l, " expected=0x");
			line_hex16(&l, want);
			line_str(&l, " got=0x");
			line_hex16(&l, got);
			line_send(&l);
		}
		return;
	}
}

/* Negotiates VERSION_1 and sets up queue 0. Returns 0 on failure. */
static int bring_up(void)
{
	if (*reg(0x00) != 0x74726976 || *reg(0x04) != 2 || *reg(0x08) != 2) {
		blk_error("no virtio-blk device at slot ", 0);
		return 0;
	}
	*reg(0x70) = 0;
	*reg(0x70) = 1;
	*reg(0x70) = 3;
	*reg(0x14) = 1;
	if (!(*reg(0x10) & 1)) {
		blk_error("no VERSION_1, features_hi=", *reg(0x10));
		return 0;
	}
	*reg(0x24) = 1;
	*reg(0x20) = 1;
	*reg(0x24) = 0;
	*reg(0x20) = 0;
	*reg(0x70) = 0xb;
	if (!(*reg(0x70) & 8)) {
		blk_error("FEATURES_OK refused, status=", *reg(0x70));
		return 0;
	}
	*reg(0x30) = 0;
	if (*reg(0x34) < QSIZE) {
		blk_error("queue too small: ", *reg(0x34));
		return 0;
	}
	*reg(0x38) = QSIZE;
	*reg(0x80) = (u32)area(DESC_OFF);
	*reg(0x84) = (u32)(area(DESC_OFF) >> 32);
	*reg(0x90) = (u32)area(AVAIL_OFF);
	*reg(0x94) = (u32)(area(AVAIL_OFF) >> 32);
	*reg(0xa0) = (u32)area(USED_OFF);
	*reg(0xa4) = (u32)(area(USED_OFF) >> 32);
	*reg(0x44) = 1;
	*reg(0x70) = 0xf;
	return 1;
}

int blk_init(void)
{
	struct blk_state *st = state();
	kmemset((void *)area(0), 0, SLOTS_OFF);
	if (!bring_up())
		return 0;
	u64 sectors = *reg(0x100) | ((u64)*reg(0x104) << 32);
	st->magic = BLK_MAGIC;
	st->blocks = sectors / 8;
	if (st->blocks == 0) {
		blk_error("disk smaller than a block: sectors=", sectors);
		return 0;
	}
	for (u64 s = 0; s < cfg.blk_slots; s++)
		st->slot_block[s] = NONE;
	struct desc *d = (struct desc *)area(DESC_OFF);
	d[0] = (struct desc){ area(REQ_OFF), 16, 1, 1 };
	d[1] = (struct desc){ 0, (u32)PAGE_SIZE, 3, 2 };
	d[2] = (struct desc){ area(STATUS_OFF), 1, 2, 0 };
	struct line l;
	line_init(&l);
	line_str(&l, "BLK ready slots=");
	line_dec(&l, cfg.blk_slots);
	line_str(&l, " blocks=");
	line_dec(&l, st->blocks);
	line_str(&l, " base=0x");
	line_hex(&l, cfg.blk_base);
	line_send(&l);
	return 1;
}

/* Publishes a read of the next block into the current slot. */
static void submit(struct blk_state *st)
{
	u64 s = st->slot;
	u64 b = (s + st->pass * (cfg.blk_slots + 1)) % st->blocks;
	volatile u64 *req = (volatile u64 *)area(REQ_OFF);
	volatile u16 *avail = (volatile u16 *)area(AVAIL_OFF);
	st->slot_block[s] = NONE;
	st->block = b;
	req[0] = 0;	 /* VIRTIO_BLK_T_IN */
	req[1] = b * 8; /* sector */
	*(volatile u8 *)area(STATUS_OFF) = 0xff;
	((volatile struct desc *)area(DESC_OFF))[1].addr = area(SLOTS_OFF + s * PAGE_SIZE);
	avail[2 + st->avail_idx % QSIZE] = 0;
	barrier();
	st->avail_idx++;
	avail[1] = (u16)st->avail_idx;
	st->inflight = 1;
	barrier();
	*reg(0x50) = 0;
}

/* Takes the finished request: checks it, records the slot's block. */
static void complete(struct blk_state *st)
{
	u8 status = *(volatile u8 *)area(STATUS_OFF);
	st->used_idx++;
	st->inflight = 0;
	if (status != 0) {
		st->errors++;
		blk_error("request failed, status=", status);
		return;
	}
	check_slot(st, st->slot, st->block, " fresh");
	st->slot_block[st->slot] = (u32)st->block;
	st->reads++;
	if (++st->slot == cfg.blk_slots) {
		st->slot = 0;
		st->pass++;
		st->lines = 0;
	}
}

void blk_step(void)
{
	struct blk_state *st = state();
	if (st->magic != BLK_MAGIC)
		return;
	if (!st->inflight)
		submit(st);
	else if (*(volatile u16 *)area(USED_OFF + 2) != (u16)st->used_idx)
		complete(st);
	for (u32 k = 0; k < VERIFY_PER_STEP; k++) {
		u64 s = st->vcursor;
		st->vcursor = s + 1 == cfg.blk_slots ? 0 : s + 1;
		u32 b = st->slot_block[s];
		if (b != NONE)
			check_slot(st, s, b, " kept");
	}
}

void blk_report(void)
{
	struct blk_state *st = state();
	struct line l;
	if (st->magic != BLK_MAGIC)
		return;
	line_init(&l);
	line_str(&l, "BLK reads=");
	line_dec(&l, st->reads);
	line_str(&l, " pass=");
	line_dec(&l, st->pass);
	line_str(&l, " verified=");
	line_dec(&l, st->verified);
	line_str(&l, " errors=");
	line_dec(&l, st->errors);
	line_send(&l);
}
