/** Shared pieces of the cache engine tests: sizes, a byte model, waiting, and media wrappers. */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Medium } from '../../src/media/medium.js';
import type { Rng } from '../helpers/rng.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** The smallest cache device dm-pcache accepts: 31 segments of 16 MiB. */
export const CACHE_SIZE = 512 * MiB;

/** Engine timings short enough that tests exercise the timers, not wait for them. */
export const FAST = { writebackIntervalMs: 50, ksetCloseMs: 20 } as const;

/** Random bytes, fast: a seeded pattern stamped with the write's number so no two writes look alike. */
export function pattern(rng: Rng, len: number): Buffer {
  const buf = Buffer.allocUnsafe(len);
  let x = (rng.int(0x7fffffff) | 1) >>> 0;
  let i = 0;
  for (; i + 4 <= len; i += 4) {
    // xorshift32: cheap and never repeats within a write.
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  for (; i < len; i++) buf[i] = rng.int(256);
  return buf;
}

/** Resolve when `cond()` holds; fail the test with `what` after `timeoutMs`. */
export async function waitFor(cond: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > until) assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(5);
  }
}

export function sha(buf: Buffer): string {
  return createHash('sha1').update(buf).digest('hex');
}

/** The first offset where two buffers differ, for a readable failure; -1 when equal. */
export function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  if (a.equals(b)) return -1;
  const STEP = 64 * KiB;
  for (let off = 0; off < a.length; off += STEP) {
    const end = Math.min(a.length, off + STEP);
    if (!a.subarray(off, end).equals(b.subarray(off, end))) {
      for (let i = off; i < end; i++) if (a[i] !== b[i]) return i;
    }
  }
  return -1;
}

/** assert that two device images are equal, naming the first differing byte rather than dumping them. */
export function assertSameImage(actual: Buffer, expected: Buffer, what: string): void {
  const at = firstDiff(actual, expected);
  if (at >= 0) {
    assert.fail(`${what}: differs at byte ${at} (sector ${Math.floor(at / 512)}): got ${actual[at]}, expected ${expected[at]}`);
  }
}

/**
 * A medium that passes everything to another one after a random delay, so that I/O completes in
 * a different order than it was issued, as on a real device.
 */
export class JitterMedium implements Medium {
  constructor(
    readonly inner: Medium,
    private readonly rng: Rng,
    private readonly maxTurns = 4,
  ) {}

  get path(): string {
    return this.inner.path;
  }

  size(): number {
    return this.inner.size();
  }

  private async jitter(): Promise<void> {
    const n = this.rng.int(this.maxTurns + 1);
    for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    await this.jitter();
    return this.inner.read(buf, offset);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    await this.jitter();
    return this.inner.write(data, offset);
  }

  sync(): Promise<void> {
    return this.inner.sync();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

/** A medium that reports every write and sync, as issued, to `observe`, then passes it on. */
export class ObservedMedium implements Medium {
  constructor(
    readonly inner: Medium,
    private readonly observe: (ev: { op: 'write'; offset: number; data: Buffer } | { op: 'sync' }) => void,
  ) {}

  get path(): string {
    return this.inner.path;
  }

  size(): number {
    return this.inner.size();
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.inner.read(buf, offset);
  }

  write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    this.observe({ op: 'write', offset, data: Buffer.isBuffer(data) ? data : Buffer.concat(data) });
    return this.inner.write(data, offset);
  }

  sync(): Promise<void> {
    this.observe({ op: 'sync' });
    return this.inner.sync();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
