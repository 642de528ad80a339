/**
 * Sparse, copy-on-write device images for crash tests. A 512 MiB cache device holds a few MiB
 * of live data in a crash test; copying it whole for every simulated power cut would cost more
 * than the test itself. A PageImage keeps only the pages written, and clone() shares them until
 * one side writes, so a crash image costs a map copy, not a device copy.
 */
import { SECTOR } from './volatile.js';

/** Page size of the map: small enough that copy-on-write stays cheap, large enough to keep maps small. */
export const PAGE = 4096;
/** Pages per chunk: clone() copies one pointer per chunk, and a write copies at most one chunk's table. */
const CHUNK_PAGES = 256;

/** A table of pages; `owned[i]` says the chunk's image may change page i in place (it is not shared). */
interface Chunk {
  pages: Array<Uint8Array | undefined>;
  owned: Uint8Array;
}

const ZERO_PAGE = new Uint8Array(PAGE);

function isZero(part: Uint8Array): boolean {
  return Buffer.compare(part, ZERO_PAGE.subarray(0, part.length)) === 0;
}

export class PageImage {
  private readonly chunks: Array<Chunk | undefined>;
  /** Chunks this image may change in place; the others are shared with a clone. */
  private ownedChunks: Uint8Array;
  private count = 0;

  /**
   * `fill`, when given, supplies the contents of pages never written (by default zeros): a large
   * image with patterned initial contents then costs nothing until it is written.
   */
  constructor(
    readonly size: number,
    readonly fill?: (pageIndex: number, page: Buffer) => void,
    from?: PageImage,
  ) {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`bad image size ${size}`);
    const n = Math.ceil(Math.ceil(size / PAGE) / CHUNK_PAGES);
    this.chunks = from ? [...from.chunks] : new Array<Chunk | undefined>(n).fill(undefined);
    this.ownedChunks = new Uint8Array(n);
    this.count = from ? from.count : 0;
  }

  /** An image with `buf` as its contents (the buffer is copied). */
  static from(buf: Buffer): PageImage {
    const img = new PageImage(buf.length);
    img.write(buf, 0);
    return img;
  }

  /** Pages held (for tests and statistics). */
  get pageCount(): number {
    return this.count;
  }

  /** A copy that costs a pointer per chunk: both sides share every page until they write to it. */
  clone(): PageImage {
    this.ownedChunks.fill(0);
    return new PageImage(this.size, this.fill, this);
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 || offset + length > this.size) {
      throw new RangeError(`page image: ${length} bytes at ${offset} are outside the image (${this.size})`);
    }
  }

  /** Has page `index` (of PAGE bytes) ever been written? A page never written holds the fill. */
  written(index: number): boolean {
    return this.page(index) !== undefined;
  }

  private page(index: number): Uint8Array | undefined {
    return this.chunks[Math.floor(index / CHUNK_PAGES)]?.pages[index % CHUNK_PAGES];
  }

  read(buf: Buffer, offset: number): void {
    this.check(offset, buf.length);
    let done = 0;
    while (done < buf.length) {
      const at = offset + done;
      const index = Math.floor(at / PAGE);
      const inPage = at - index * PAGE;
      const n = Math.min(PAGE - inPage, buf.length - done);
      const page = this.page(index);
      if (page) buf.set(page.subarray(inPage, inPage + n), done);
      else if (this.fill) this.blank(index).copy(buf, done, inPage, inPage + n);
      else buf.fill(0, done, done + n);
      done += n;
    }
  }

  /** `length` bytes at `offset`, in a new buffer. */
  slice(offset: number, length: number): Buffer {
    const b = Buffer.allocUnsafe(length);
    this.read(b, offset);
    return b;
  }

  write(data: Uint8Array, offset: number): void {
    this.check(offset, data.length);
    let done = 0;
    while (done < data.length) {
      const at = offset + done;
      const index = Math.floor(at / PAGE);
      const inPage = at - index * PAGE;
      const n = Math.min(PAGE - inPage, data.length - done);
      const part = data.subarray(done, done + n);
      // Zeros over a page never written (and read as zeros) change nothing: keep the image sparse.
      if (!(this.fill === undefined && this.page(index) === undefined && isZero(part))) this.writable(index, n === PAGE).set(part, inPage);
      done += n;
    }
  }

  /** The contents of a page never written. */
  private blank(index: number): Buffer {
    const page = Buffer.alloc(Math.min(PAGE, this.size - index * PAGE));
    this.fill?.(index, page);
    return page;
  }

  private writable(index: number, whole: boolean): Uint8Array {
    const c = Math.floor(index / CHUNK_PAGES);
    const i = index % CHUNK_PAGES;
    let chunk = this.chunks[c];
    if (!chunk || !this.ownedChunks[c]) {
      chunk = chunk
        ? { pages: [...chunk.pages], owned: new Uint8Array(CHUNK_PAGES) }
        : { pages: new Array<Uint8Array | undefined>(CHUNK_PAGES).fill(undefined), owned: new Uint8Array(CHUNK_PAGES) };
      this.chunks[c] = chunk;
      this.ownedChunks[c] = 1;
    }
    let page = chunk.pages[i];
    if (page && chunk.owned[i]) return page;
    // A page about to be overwritten whole needs neither its old contents nor the fill.
    const fresh = new Uint8Array(Math.min(PAGE, this.size - index * PAGE));
    if (!page) this.count++;
    if (page && !whole) fresh.set(page);
    else if (!page && !whole && this.fill) this.fill(index, Buffer.from(fresh.buffer, fresh.byteOffset, fresh.length));
    page = fresh;
    chunk.pages[i] = page;
    chunk.owned[i] = 1;
    return page;
  }

  /** The whole image as one buffer (small images only). */
  toBuffer(): Buffer {
    const out = Buffer.alloc(this.size);
    this.read(out, 0);
    return out;
  }
}

interface Pending {
  readonly offset: number;
  readonly data: Buffer;
  seq: number;
}

/** How a crash treats the writes no sync covered. */
export interface CrashOptions {
  /**
   * Chance that each 512-byte sector of an unsynced write survives; default 0.5. A function gets
   * the sector's device offset and the write it belongs to, so a test can choose exactly what a
   * power cut keeps (1: always, 0: never).
   */
  keep?: number | ((sectorOffset: number, write: { offset: number; length: number }) => number);
}

/**
 * VolatileImage on sparse pages: what reads see (`current`) versus what a sync made durable, and
 * the image a power cut would leave: every synced write, plus each 512-byte sector of each
 * unsynced or in-flight write independently kept or lost, overlapping writes landing in a random
 * order.
 */
export class SparseVolatileImage {
  readonly current: PageImage;
  private readonly durable: PageImage;
  private readonly inflight = new Set<Pending>();
  private completed: Pending[] = [];
  private seq = 0;

  /** Both the durable and the visible contents start as `base` (which is not changed). */
  constructor(base: PageImage) {
    this.current = base.clone();
    this.durable = base.clone();
  }

  get size(): number {
    return this.current.size;
  }

  /** Writes issued or completed that no sync has covered yet. */
  get unsynced(): number {
    return this.inflight.size + this.completed.length;
  }

  begin(offset: number, data: Buffer): Pending {
    const w: Pending = { offset, data, seq: 0 };
    this.inflight.add(w);
    return w;
  }

  land(w: Pending): void {
    this.current.write(w.data, w.offset);
    this.inflight.delete(w);
    w.seq = ++this.seq;
    this.completed.push(w);
  }

  drop(w: Pending): void {
    this.inflight.delete(w);
  }

  mark(): number {
    return this.seq;
  }

  persist(mark: number): void {
    let i = 0;
    for (; i < this.completed.length && this.completed[i]!.seq <= mark; i++) {
      const w = this.completed[i]!;
      this.durable.write(w.data, w.offset);
    }
    this.completed.splice(0, i);
  }

  /** The durable contents alone (what a crash that keeps no unsynced write leaves). */
  durableImage(): PageImage {
    return this.durable.clone();
  }

  crash(rng: () => number, opts: CrashOptions = {}): PageImage {
    const keep = opts.keep ?? 0.5;
    const out = this.durable.clone();
    const writes = [...this.completed, ...this.inflight];
    for (let i = writes.length - 1; i > 0; i--) {
      const j = Math.floor(rng() * (i + 1));
      [writes[i], writes[j]] = [writes[j]!, writes[i]!];
    }
    for (const w of writes) {
      const end = w.offset + w.data.length;
      for (let pos = w.offset; pos < end; ) {
        const next = Math.min(end, (Math.floor(pos / SECTOR) + 1) * SECTOR);
        const p = typeof keep === 'number' ? keep : keep(Math.floor(pos / SECTOR) * SECTOR, { offset: w.offset, length: w.data.length });
        if (rng() < p) out.write(w.data.subarray(pos - w.offset, next - w.offset), pos);
        pos = next;
      }
    }
    return out;
  }
}

/**
 * A plain cache medium on a PageImage: no durability tracking, and every call resolves without a
 * trip through the event loop, so a fuzz loop can open thousands of 512 MiB devices cheaply.
 */
export class PageMedium {
  private closed = false;

  constructor(
    readonly image: PageImage,
    readonly path = 'page-medium',
  ) {}

  size(): number {
    return this.image.size;
  }

  private usable(op: string, offset: number, length: number): void {
    if (this.closed) throw new Error(`${this.path} is closed`);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > this.image.size) {
      throw Object.assign(new RangeError(`${this.path}: ${op} of ${length} bytes at offset ${offset} is outside the device (size ${this.image.size})`), {
        code: 'EINVAL',
      });
    }
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.usable('read', offset, buf.length);
    this.image.read(buf, offset);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    const bufs = Buffer.isBuffer(data) ? [data] : data;
    let len = 0;
    for (const b of bufs) len += b.length;
    this.usable('write', offset, len);
    for (const b of bufs) {
      this.image.write(b, offset);
      offset += b.length;
    }
  }

  async sync(): Promise<void> {
    if (this.closed) throw new Error(`${this.path} is closed`);
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}
