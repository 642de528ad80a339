/** Shared pieces of the cache engine tests: sizes, a byte model, waiting, and media wrappers. */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, readSync, writeSync } from 'node:fs';
import { after } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BackingDevice } from '../../src/backing/backing.js';
import { Gate, settle, type HoldController, type IoOp, type IoPredicate } from '../../src/media/gate.js';
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

/**
 * The expected content of a device, kept in a sparse temporary file rather than in memory: page
 * cache is cheap here, while touching gigabytes of fresh anonymous memory is slow.
 */
const ZEROS = Buffer.alloc(4 * MiB);

export class ModelFile {
  private readonly fd: number;

  constructor(
    readonly path: string,
    readonly size: number,
  ) {
    this.fd = openSync(path, 'w+');
    ftruncateSync(this.fd, size);
  }

  write(off: number, data: Buffer): void {
    let done = 0;
    while (done < data.length) done += writeSync(this.fd, data, done, data.length - done, off + done);
  }

  zero(off: number, len: number): void {
    const z = ZEROS;
    for (let pos = off; pos < off + len; pos += z.length) this.write(pos, z.subarray(0, Math.min(z.length, off + len - pos)));
  }

  read(off: number, len: number): Buffer {
    return this.readInto(Buffer.allocUnsafe(len), off);
  }

  /** Fill `buf` from `off` (reusing one buffer avoids page faults, which are slow on this VM). */
  readInto(buf: Buffer, off: number): Buffer {
    let done = 0;
    while (done < buf.length) {
      const n = readSync(this.fd, buf, done, buf.length - done, off + done);
      if (n === 0) {
        buf.fill(0, done);
        break;
      }
      done += n;
    }
    return buf;
  }

  close(): void {
    closeSync(this.fd);
  }
}

/** Compare a device, read through `read`, with the model, a few MiB at a time. */
export async function assertDeviceEqualsModel(read: (buf: Buffer, off: number) => Promise<void>, model: ModelFile, what: string): Promise<void> {
  const got = Buffer.allocUnsafe(4 * MiB);
  const want = Buffer.allocUnsafe(4 * MiB);
  for (let off = 0; off < model.size; off += got.length) {
    const n = Math.min(got.length, model.size - off);
    await read(got.subarray(0, n), off);
    model.readInto(want.subarray(0, n), off);
    const at = firstDiff(got.subarray(0, n), want.subarray(0, n));
    if (at >= 0) assert.fail(`${what}: differs at byte ${off + at} (got ${got[at]}, expected ${want[at]})`);
  }
}

/**
 * Any medium behind a Gate: the test can hold, release and fail chosen I/O (as CrashMedium can)
 * on a cheap in-memory medium. A sync is op 'flush' with offset 0 and length 0.
 */
export class GatedMedium implements Medium {
  readonly gate: Gate;
  /** Sees every I/O as it is issued, before any hold. */
  onIo: ((op: IoOp, offset: number, length: number) => void) | undefined;

  constructor(readonly inner: Medium) {
    this.gate = new Gate(inner.path);
  }

  get path(): string {
    return this.inner.path;
  }

  size(): number {
    return this.inner.size();
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.onIo?.('read', offset, buf.length);
    await this.gate.pass('read', offset, buf.length);
    return this.inner.read(buf, offset);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    const len = Buffer.isBuffer(data) ? data.length : data.reduce((n, b) => n + b.length, 0);
    this.onIo?.('write', offset, len);
    await this.gate.pass('write', offset, len);
    return this.inner.write(data, offset);
  }

  async sync(): Promise<void> {
    this.onIo?.('flush', 0, 0);
    await this.gate.pass('flush', 0, 0);
    return this.inner.sync();
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  hold(pred: IoPredicate, ops?: readonly IoOp[]): HoldController {
    return this.gate.hold(pred, ops);
  }
}

const CHUNK = 64 * KiB;
/**
 * 64 KiB chunks handed back by stores that are done, for the next store. Memory this process has
 * touched once is cheap to reuse; fresh memory costs a page fault per 4 KiB, which is slow here.
 */
const chunkPool: Buffer[] = [];

/** A sparse byte array of any size: only the 64 KiB chunks ever written are stored. */
export class SparseStore {
  private readonly chunks = new Map<number, Buffer>();

  constructor(readonly size: number) {}

  private check(off: number, len: number): void {
    if (!Number.isSafeInteger(off) || off < 0 || !Number.isSafeInteger(len) || len < 0 || off + len > this.size) {
      throw Object.assign(new RangeError(`${len} bytes at ${off} are outside the store (${this.size})`), { code: 'EINVAL' });
    }
  }

  read(buf: Buffer, off: number): Buffer {
    this.check(off, buf.length);
    for (let done = 0; done < buf.length; ) {
      const at = off + done;
      const idx = Math.floor(at / CHUNK);
      const inChunk = at - idx * CHUNK;
      const n = Math.min(CHUNK - inChunk, buf.length - done);
      const c = this.chunks.get(idx);
      if (c) c.copy(buf, done, inChunk, inChunk + n);
      else buf.fill(0, done, done + n);
      done += n;
    }
    return buf;
  }

  write(data: Buffer, off: number): void {
    this.check(off, data.length);
    for (let done = 0; done < data.length; ) {
      const at = off + done;
      const idx = Math.floor(at / CHUNK);
      const inChunk = at - idx * CHUNK;
      const n = Math.min(CHUNK - inChunk, data.length - done);
      let c = this.chunks.get(idx);
      if (!c) {
        c = chunkPool.pop()?.fill(0) ?? Buffer.alloc(CHUNK);
        this.chunks.set(idx, c);
      }
      data.copy(c, inChunk, done, done + n);
      done += n;
    }
  }

  zero(off: number, len: number): void {
    this.check(off, len);
    for (let pos = off; pos < off + len; ) {
      const idx = Math.floor(pos / CHUNK);
      const inChunk = pos - idx * CHUNK;
      const n = Math.min(CHUNK - inChunk, off + len - pos);
      this.chunks.get(idx)?.fill(0, inChunk, inChunk + n);
      pos += n;
    }
  }

  /** The first byte where this store and `other` differ (missing chunks read as zeros); -1 if equal. */
  firstDiff(other: SparseStore): number {
    if (other.size !== this.size) return 0;
    const zero = Buffer.alloc(CHUNK);
    const idxs = new Set([...this.chunks.keys(), ...other.chunks.keys()]);
    let first = -1;
    for (const idx of idxs) {
      const a = this.chunks.get(idx) ?? zero;
      const b = other.chunks.get(idx) ?? zero;
      const at = firstDiff(a, b);
      if (at >= 0 && (first < 0 || idx * CHUNK + at < first)) first = idx * CHUNK + at;
    }
    return first;
  }

  /** Give the memory back to the pool; the store is empty afterwards. */
  release(): void {
    for (const c of this.chunks.values()) chunkPool.push(c);
    this.chunks.clear();
  }
}

/** A cache device over a SparseStore; like MemoryMedium, every call completes on a later turn. */
export class StoreMedium implements Medium {
  readonly store: SparseStore;

  constructor(
    size: number,
    readonly path = 'store-medium',
  ) {
    this.store = new SparseStore(size);
  }

  size(): number {
    return this.store.size;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    await settle();
    this.store.read(buf, offset);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    await settle();
    for (const b of Buffer.isBuffer(data) ? [data] : data) {
      this.store.write(b, offset);
      offset += b.length;
    }
  }

  async sync(): Promise<void> {
    await settle();
  }

  async close(): Promise<void> {}
}

/** A backing device over a SparseStore (any size, memory only for what is written). */
export class StoreBacking implements BackingDevice {
  readonly store: SparseStore;
  flushes = 0;

  constructor(
    size: number,
    readonly name = 'store-backing',
  ) {
    this.store = new SparseStore(size);
  }

  size(): number {
    return this.store.size;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    await settle();
    this.store.read(buf, offset);
  }

  async write(data: Buffer, offset: number): Promise<void> {
    await settle();
    this.store.write(data, offset);
  }

  async flush(): Promise<void> {
    await settle();
    this.flushes++;
  }

  async close(): Promise<void> {}
}

/**
 * The engine's timers are unref'd (a cache must not keep its process up by itself), so a test
 * that waits on background work (a held I/O to be reached, write-back to run) keeps the process
 * up with this for the length of the file.
 */
export function keepProcessAlive(): void {
  const t = setInterval(() => undefined, 1000);
  after(() => clearInterval(t));
}
