/* cryo test kernel: formatting and the serial console (ring 0 and ring 3). */
#include "kernel.h"

#define COM1 0x3f8

volatile u32 console_lock;

void *kmemset(void *d, int c, u64 n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *kmemcpy(void *d, const void *s, u64 n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int kmemcmp(const void *a, const void *b, u64 n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p < *q ? -1 : 1;
	return 0;
}

/* GCC may emit calls to these even with -fno-builtin. */
void *memset(void *d, int c, usize n) { return kmemset(d, c, n); }
void *memcpy(void *d, const void *s, usize n) { return kmemcpy(d, s, n); }
int memcmp(const void *a, const void *b, usize n) { return kmemcmp(a, b, n); }

void serial_init(void)
{
	outb(COM1 + 1, 0x00); /* IER: no interrupts */
	outb(COM1 + 3, 0x80); /* DLAB */
	outb(COM1 + 0, 0x01); /* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8n1 */
	outb(COM1 + 2, 0xc7); /* FIFO on, cleared */
	outb(COM1 + 4, 0x03); /* DTR RTS, OUT2 off: no IRQ */
}

static void serial_putc(char c)
{
	/* Bounded wait for THR empty (LSR bit 5). */
	for (u32 i = 0; i < 1000000; i++)
		if (inb(COM1 + 5) & 0x20)
			break;
	outb(COM1, (u8)c);
}

void line_init(struct line *l) { l->len = 0; }

void line_char(struct line *l, char c)
{
	if (l->len < sizeof(l->buf) - 2)
		l->buf[l->len++] = c;
}

void line_str(struct line *l, const char *s)
{
	while (*s)
		line_char(l, *s++);
}

void line_strn(struct line *l, const char *s, u64 n)
{
	for (u64 i = 0; i < n && s[i]; i++)
		line_char(l, s[i]);
}

void line_dec(struct line *l, u64 v)
{
	char tmp[24];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		line_char(l, tmp[--n]);
}

static const char hexdig[] = "0123456789abcdef";

void line_hex(struct line *l, u64 v)
{
	char tmp[16];
	int n = 0;
	do {
		tmp[n++] = hexdig[v & 15];
		v >>= 4;
	} while (v);
	while (n)
		line_char(l, tmp[--n]);
}

void line_hex16(struct line *l, u64 v)
{
	for (int s = 60; s >= 0; s -= 4)
		line_char(l, hexdig[(v >> s) & 15]);
}

static void send_raw(struct line *l)
{
	for (u32 i = 0; i < l->len; i++)
		serial_putc(l->buf[i]);
	serial_putc('\n');
}

void line_send(struct line *l)
{
	while (xchg32(&console_lock, 1))
		cpu_relax();
	send_raw(l);
	xchg32(&console_lock, 0);
}

void line_send_force(struct line *l)
{
	u64 i;
	for (i = 0; i < 10000000; i++) {
		if (!xchg32(&console_lock, 1))
			break;
		cpu_relax();
	}
	send_raw(l);
	xchg32(&console_lock, 0);
}
