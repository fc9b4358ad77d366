/*
 * cryo test kernel: the ring-3 workload, one instance per vCPU, running
 * natively. All state lives in guest memory (the vCPU's own share of the
 * pool), so a snapshot taken at any instant and restored later continues
 * where it left off; any page restored from a different moment than its
 * generation-table entry shows up as a MISMATCH.
 */
#include "kernel.h"

#define WORDS_PER_PAGE 512
#define VERIFY_BATCH 32
#define UNLIMITED_WRITE_BATCH 32
#define MAX_WRITE_BURST 4096
#define MISMATCH_LINES_PER_SWEEP 16
#define STATE_MAGIC 0x6372796f53544154ULL /* "cryoSTAT" */

struct cpu_state {
	u64 magic;
	u64 seq;	/* heartbeats printed so far (last seq) */
	u64 writes;	/* page rewrites (fill excluded) */
	u64 verified;	/* page verifications */
	u64 sweeps;	/* completed verification sweeps */
	u64 errors;	/* page verifications that found a mismatch */
	u64 prng;
	u64 last_tsc;
	u64 cursor;	/* next page to verify */
	u64 next_write_tsc;
	u64 next_hb_tsc;
	u64 sweep_lines; /* MISMATCH lines printed in this sweep */
	u64 data_pages;
	u64 last_sweep_line_tsc; /* when the last SWEEP line was printed */
	u64 pad[2];
	u32 gen[];	/* generation of each data page */
};

static inline u64 page_seed(u64 page, u64 gen)
{
	return fmix64(cfg.salt ^ fmix64((page << 20) ^ gen ^ 0x9e3779b97f4a7c15ULL));
}

/* Word j of a page with seed s: a bijective mix of s + (j+1)*golden. */
static inline u64 word_at(u64 s, u64 j)
{
	u64 z = s + (j + 1) * 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	return z ^ (z >> 31);
}

static void write_page(u64 *p, u64 page, u64 gen)
{
	u64 s = page_seed(page, gen);
	for (u64 j = 0; j < WORDS_PER_PAGE; j++)
		p[j] = word_at(s, j);
}

static u64 prng_next(struct cpu_state *st)
{
	u64 x = st->prng;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	st->prng = x;
	return x * 0x2545f4914f6cdd1dULL;
}

static void print_kv(struct line *l, const char *k, u64 v)
{
	line_str(l, k);
	line_dec(l, v);
}

static u64 tsc_now(struct cpu_state *st, u64 cpu, u64 hb_ticks)
{
	u64 t = rdtsc();
	if (t < st->last_tsc) {
		struct line l;
		line_init(&l);
		print_kv(&l, "TSC-BACKWARDS cpu=", cpu);
		print_kv(&l, " prev=", st->last_tsc);
		print_kv(&l, " now=", t);
		line_send(&l);
		/* keep the schedule sane */
		st->next_write_tsc = t;
		st->next_hb_tsc = t + hb_ticks;
	}
	st->last_tsc = t;
	return t;
}

static void verify_page(struct cpu_state *st, u64 *data, u64 cpu, u64 page)
{
	u64 *p = data + page * WORDS_PER_PAGE;
	u64 gen = st->gen[page];
	u64 s = page_seed(page, gen);
	for (u64 j = 0; j < WORDS_PER_PAGE; j++) {
		u64 want = word_at(s, j);
		u64 got = p[j];
		if (got != want) {
			st->errors++;
			if (st->sweep_lines < MISMATCH_LINES_PER_SWEEP) {
				struct line l;
				st->sweep_lines++;
				line_init(&l);
				print_kv(&l, "MISMATCH cpu=", cpu);
				print_kv(&l, " page=", page);
				print_kv(&l, " word=", j);
				print_kv(&l, " gen=", gen);
				line_str(&l, " expected=0x");
				line_hex16(&l, want);
				line_str(&l, " got=0x");
				line_hex16(&l, got);
				line_send(&l);
			}
			break;
		}
	}
	st->verified++;
}

static void rewrite_one(struct cpu_state *st, u64 *data)
{
	u64 r = prng_next(st);
	u64 page = ((r >> 32) * st->data_pages) >> 32;
	u32 g = st->gen[page] + 1;
	if (g == 0)
		g = 1;
	write_page(data + page * WORDS_PER_PAGE, page, g);
	__asm__ volatile("" ::: "memory");
	st->gen[page] = g;
	st->writes++;
}

static void heartbeat(struct cpu_state *st, u64 cpu, u64 now)
{
	struct line l;
	st->seq++;
	line_init(&l);
	print_kv(&l, "HB cpu=", cpu);
	print_kv(&l, " seq=", st->seq);
	print_kv(&l, " tsc=", now);
	print_kv(&l, " writes=", st->writes);
	print_kv(&l, " verified=", st->verified);
	print_kv(&l, " sweeps=", st->sweeps);
	print_kv(&l, " errors=", st->errors);
	line_send(&l);
	if (cpu == 0 && cfg.blk_slots)
		blk_report();
}

void user_main(u64 cpu)
{
	struct line l;
	u64 share = cfg.share_bytes;
	u8 *base = (u8 *)(POOL_VA + cpu * share);
	struct cpu_state *st = (struct cpu_state *)base;
	u64 npages = share / PAGE_SIZE;
	u64 state_pages = (sizeof(struct cpu_state) + 4 * npages + PAGE_SIZE - 1) / PAGE_SIZE;
	u64 dpages = npages > state_pages ? npages - state_pages : 0;
	u64 *data = (u64 *)(base + state_pages * PAGE_SIZE);
	u64 tsc_hz = cfg.tsc_khz * 1000;
	u64 hb_ticks = cfg.tsc_khz * cfg.hb_ms;
	u64 write_ticks = cfg.rate ? tsc_hz / cfg.rate : 0;

	if (write_ticks == 0)
		write_ticks = 1;

	line_init(&l);
	print_kv(&l, "READY cpu=", cpu);
	print_kv(&l, " apic=", cfg.apic_ids[cpu]);
	print_kv(&l, " pages=", dpages);
	line_str(&l, cfg.mode == MODE_FILL ? " mode=fill" : " mode=verify");
	line_send(&l);
	if (dpages == 0) {
		line_init(&l);
		print_kv(&l, "ERROR not enough memory: need ", 1);
		print_kv(&l, " MiB have ", share / MIB);
		line_str(&l, " MiB");
		line_send(&l);
		__asm__ volatile("int $0x80");
	}

	/* Fresh state (the host gives zeroed RAM, but do not rely on it). */
	st->magic = STATE_MAGIC;
	st->seq = 0;
	st->writes = 0;
	st->verified = 0;
	st->sweeps = 0;
	st->errors = 0;
	st->prng = fmix64(cfg.salt ^ (cpu + 1) * 0x9e3779b97f4a7c15ULL) | 1;
	st->last_tsc = rdtsc();
	st->cursor = 0;
	st->sweep_lines = 0;
	st->data_pages = dpages;
	st->last_sweep_line_tsc = 0;

	/* Heartbeats run during the initial fill too (a big share takes seconds). */
	u64 now = tsc_now(st, cpu, hb_ticks);
	st->next_write_tsc = now;
	st->next_hb_tsc = now + hb_ticks;
	for (u64 p = 0; p < dpages; p++) {
		write_page(data + p * WORDS_PER_PAGE, p, 1);
		st->gen[p] = 1;
		if ((p & 255) == 255) {
			now = tsc_now(st, cpu, hb_ticks);
			if (now >= st->next_hb_tsc) {
				heartbeat(st, cpu, now);
				st->next_hb_tsc += hb_ticks;
				if (st->next_hb_tsc <= now)
					st->next_hb_tsc = now + hb_ticks;
			}
		}
	}

	if (cfg.mode == MODE_FILL) {
		line_init(&l);
		print_kv(&l, "FILLED cpu=", cpu);
		print_kv(&l, " pages=", dpages);
		print_kv(&l, " mib=", dpages * PAGE_SIZE / MIB);
		line_send(&l);
		for (;;)
			__asm__ volatile("int $0x80");
	}

	if (cpu == 0 && cfg.blk_slots)
		blk_init();
	now = tsc_now(st, cpu, hb_ticks);
	st->next_write_tsc = now;

	for (;;) {
		if (cpu == 0 && cfg.blk_slots)
			blk_step();
		for (u32 k = 0; k < VERIFY_BATCH; k++) {
			u64 c = st->cursor;
			if (c >= st->data_pages)
				c = 0;
			verify_page(st, data, cpu, c);
			c++;
			if (c >= st->data_pages) {
				c = 0;
				st->sweeps++;
				st->sweep_lines = 0;
				/* at most one SWEEP line per heartbeat interval */
				u64 t = rdtsc();
				if (st->sweeps == 1 || t - st->last_sweep_line_tsc >= hb_ticks) {
					st->last_sweep_line_tsc = t;
					line_init(&l);
					print_kv(&l, "SWEEP cpu=", cpu);
					print_kv(&l, " n=", st->sweeps);
					print_kv(&l, " pages=", st->data_pages);
					print_kv(&l, " errors=", st->errors);
					line_send(&l);
				}
			}
			st->cursor = c;
		}

		now = tsc_now(st, cpu, hb_ticks);
		if (cfg.rate == 0) {
			for (u32 k = 0; k < UNLIMITED_WRITE_BATCH; k++)
				rewrite_one(st, data);
		} else {
			for (u32 k = 0; k < MAX_WRITE_BURST && now >= st->next_write_tsc; k++) {
				rewrite_one(st, data);
				st->next_write_tsc += write_ticks;
			}
			/* far behind (e.g. after a pause or restore): do not catch up */
			if (now > st->next_write_tsc && now - st->next_write_tsc > tsc_hz / 10)
				st->next_write_tsc = now;
		}

		now = tsc_now(st, cpu, hb_ticks);
		if (now >= st->next_hb_tsc) {
			heartbeat(st, cpu, now);
			st->next_hb_tsc += hb_ticks;
			if (st->next_hb_tsc <= now)
				st->next_hb_tsc = now + hb_ticks;
		}
	}
}
