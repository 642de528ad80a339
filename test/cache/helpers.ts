/**
 * Shared pieces of the cache engine tests: sizes, data patterns, waiting, sparse in-memory devices
 * (with crash images), and media wrappers that reorder, observe, hold or fail I/O.
 */
import assert from 'node:assert/strict';
import { after } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BackingDevice } from '../../src/backing/backing.js';
import { formatCache } from '../../src/cache/format.js';
import { dirtyTailOffset, encodePosition, FormatError, keyTailOffset, SEG_DATA_OFF, SEG_DATA_SIZE, SEG_SIZE, SEGMENTS_OFF, type Position } from '../../src/format/index.js';
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

/** Random-looking bytes, fast: an xorshift sequence from a fresh seed per call, so no two writes look alike. */
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

/**
 * Like pattern(), cheaper for large writes: a random 520-byte block repeated. As 520 is not a
 * multiple of 512, every sector of the write differs from its neighbours.
 */
export function quickPattern(rng: Rng, len: number): Buffer {
  return Buffer.allocUnsafe(len).fill(pattern(rng, 520));
}

/** Resolve when `cond()` holds; fail the test with `what` after `timeoutMs`. */
export async function waitFor(cond: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > until) assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(5);
  }
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

  /** An independent copy. */
  clone(): SparseStore {
    const c = new SparseStore(this.size);
    for (const [idx, chunk] of this.chunks) c.chunks.set(idx, (chunkPool.pop() ?? Buffer.allocUnsafe(CHUNK)).fill(chunk));
    return c;
  }

  /** The chunks that hold data, in offset order (for writing the store out sparsely). */
  *extents(): IterableIterator<{ off: number; data: Buffer }> {
    for (const idx of [...this.chunks.keys()].sort((a, b) => a - b)) yield { off: idx * CHUNK, data: this.chunks.get(idx)! };
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
    sizeOrStore: number | SparseStore,
    readonly path = 'store-medium',
  ) {
    this.store = typeof sizeOrStore === 'number' ? new SparseStore(sizeOrStore) : sizeOrStore;
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
    sizeOrStore: number | SparseStore,
    readonly name = 'store-backing',
  ) {
    this.store = typeof sizeOrStore === 'number' ? new SparseStore(sizeOrStore) : sizeOrStore;
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

interface Pending {
  off: number;
  data: Buffer;
  seq: number;
}

/**
 * What a device holds versus what a power cut would leave, over sparse stores (the semantics of
 * src/media/volatile.ts, which needs dense buffers): reads see every completed write; a sync makes
 * durable the writes completed before it began; a crash keeps each 512-byte sector of every other
 * write, completed or in flight, or not, at random, overlapping ones landing in random order.
 * The power stays off: I/O after the crash (of an engine still winding down) is dropped.
 */
export class CrashStore {
  readonly current: SparseStore;
  private readonly durable: SparseStore;
  private readonly inflight = new Set<Pending>();
  private completed: Pending[] = [];
  private seq = 0;
  /** After crash(), the image is taken: later I/O of whoever still holds the device changes nothing. */
  private crashed = false;

  constructor(size: number) {
    this.current = new SparseStore(size);
    this.durable = new SparseStore(size);
  }

  async write(data: Buffer, off: number): Promise<void> {
    const w: Pending = { off, data: Buffer.from(data), seq: 0 };
    this.inflight.add(w);
    await settle();
    if (this.crashed) return;
    this.current.write(w.data, off);
    this.inflight.delete(w);
    w.seq = ++this.seq;
    this.completed.push(w);
  }

  async sync(): Promise<void> {
    const mark = this.seq;
    await settle();
    if (this.crashed) return;
    let i = 0;
    for (; i < this.completed.length && this.completed[i]!.seq <= mark; i++) this.durable.write(this.completed[i]!.data, this.completed[i]!.off);
    this.completed.splice(0, i);
  }

  /** The image a power cut now would leave. `consume` builds it in place: cheaper, but the end of this store. */
  crash(rng: Rng, consume = false): SparseStore {
    this.crashed = true;
    const out = consume ? this.durable : this.durable.clone();
    const writes = [...this.completed, ...this.inflight];
    for (let i = writes.length - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [writes[i], writes[j]] = [writes[j]!, writes[i]!];
    }
    for (const w of writes) {
      const end = w.off + w.data.length;
      for (let pos = w.off; pos < end; ) {
        const next = Math.min(end, (Math.floor(pos / 512) + 1) * 512);
        if (rng.next() < 0.5) out.write(w.data.subarray(pos - w.off, next - w.off), pos);
        pos = next;
      }
    }
    return out;
  }
}

/** A cache device that can crash (CrashStore). */
export class CrashStoreMedium implements Medium {
  readonly img: CrashStore;

  constructor(
    size: number,
    readonly path = 'crash-store-medium',
  ) {
    this.img = new CrashStore(size);
  }

  size(): number {
    return this.img.current.size;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    await settle();
    this.img.current.read(buf, offset);
  }

  write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    return this.img.write(Buffer.isBuffer(data) ? data : Buffer.concat(data), offset);
  }

  sync(): Promise<void> {
    return this.img.sync();
  }

  async close(): Promise<void> {}
}

/** A backing device that can crash (CrashStore): the same store behind the backing interface. */
export class CrashStoreBacking extends CrashStoreMedium implements BackingDevice {
  constructor(
    size: number,
    readonly name = 'crash-store-backing',
  ) {
    super(size, name);
  }

  flush(): Promise<void> {
    return this.sync();
  }
}

/**
 * Format `medium` and move key_tail and dirty_tail (with an empty log) to `room` bytes before the
 * end of cache segment 0's data area, as if that much log had been written and collected: the
 * log then moves to a new segment (a LAST kset) after a few ksets, which a test can afford.
 */
export async function formatWithLogNearEnd(medium: Medium, opts: { dataCrc: boolean; gcPercent: number }, room = 8 * KiB): Promise<Position> {
  const f = await formatCache(medium, { dataCrc: opts.dataCrc, gcPercent: opts.gcPercent });
  assert.ok(!(f instanceof FormatError), String(f));
  const pos: Position = { seg: 0, off: SEG_DATA_SIZE - room };
  // A fresh format writes both tails in slot 0 with seq 1; seq 2 in slot 1 is newer.
  await medium.write(encodePosition({ seq: 2, ...pos }), keyTailOffset(1));
  await medium.write(encodePosition({ seq: 2, ...pos }), dirtyTailOffset(1));
  await medium.sync();
  return pos;
}

/** Where a medium offset lies in the log (a fresh format maps cache segment i to physical i). */
export function logPositionOf(offset: number): Position | null {
  const rel = offset - SEGMENTS_OFF;
  if (rel < 0) return null;
  const seg = Math.floor(rel / SEG_SIZE);
  const off = rel - seg * SEG_SIZE - SEG_DATA_OFF;
  return off >= 0 ? { seg, off } : null;
}
