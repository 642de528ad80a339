/** Test media: a sparse in-memory device, and a wrapper that records out-of-bounds access. */
import type { Medium } from '../../src/media/medium.js';

const CHUNK = 64 * 1024;

/**
 * A device of any size that stores only the chunks written, and answers without a trip through
 * the event loop, so a fuzz loop can run a full check thousands of times on a 512 MiB device.
 */
export class SparseMedium implements Medium {
  private readonly chunks = new Map<number, Buffer>();

  constructor(
    private readonly bytes: number,
    readonly path = 'sparse',
  ) {}

  size(): number {
    return this.bytes;
  }

  private inRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > this.bytes) {
      throw new RangeError(`${this.path}: ${length} bytes at ${offset} are outside the device (${this.bytes})`);
    }
  }

  readSync(buf: Buffer, offset: number): void {
    this.inRange(offset, buf.length);
    let done = 0;
    while (done < buf.length) {
      const at = offset + done;
      const index = Math.floor(at / CHUNK);
      const inChunk = at - index * CHUNK;
      const n = Math.min(CHUNK - inChunk, buf.length - done);
      const chunk = this.chunks.get(index);
      if (chunk) chunk.copy(buf, done, inChunk, inChunk + n);
      else buf.fill(0, done, done + n);
      done += n;
    }
  }

  writeSync(data: Buffer, offset: number): void {
    this.inRange(offset, data.length);
    let done = 0;
    while (done < data.length) {
      const at = offset + done;
      const index = Math.floor(at / CHUNK);
      const inChunk = at - index * CHUNK;
      const n = Math.min(CHUNK - inChunk, data.length - done);
      let chunk = this.chunks.get(index);
      if (!chunk) this.chunks.set(index, (chunk = Buffer.alloc(CHUNK)));
      data.copy(chunk, inChunk, done, done + n);
      done += n;
    }
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.readSync(buf, offset);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    for (const b of Buffer.isBuffer(data) ? [data] : data) {
      this.writeSync(b, offset);
      offset += b.length;
    }
  }

  async sync(): Promise<void> {}
  async close(): Promise<void> {}
}

/** Passes everything through, but remembers every read or write that would leave the device. */
export class BoundsWatch implements Medium {
  readonly violations: string[] = [];
  reads = 0;

  /**
   * `readLimit` turns a reader that never stops into a failure the test can see: past it every
   * read rejects (a loop of reads that resolve at once would otherwise starve every timer).
   */
  constructor(
    readonly inner: Medium,
    readonly readLimit = Infinity,
  ) {}

  get path(): string {
    return this.inner.path;
  }

  size(): number {
    return this.inner.size();
  }

  private watch(op: string, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || offset + length > this.inner.size()) {
      this.violations.push(`${op} of ${length} bytes at ${offset}`);
    }
  }

  read(buf: Buffer, offset: number): Promise<void> {
    if (++this.reads > this.readLimit) return Promise.reject(new Error(`read limit of ${this.readLimit} reads exceeded`));
    this.watch('read', offset, buf.length);
    return this.inner.read(buf, offset);
  }

  write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    const len = Buffer.isBuffer(data) ? data.length : data.reduce((n, b) => n + b.length, 0);
    this.watch('write', offset, len);
    return this.inner.write(data, offset);
  }

  sync(): Promise<void> {
    return this.inner.sync();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

/** Reads `inner` with some bytes replaced: a damaged copy of a large image without copying it. */
export class PatchedMedium implements Medium {
  constructor(
    readonly inner: Medium,
    readonly patches: ReadonlyArray<{ offset: number; bytes: Buffer }>,
  ) {}

  get path(): string {
    return `${this.inner.path} (patched)`;
  }

  size(): number {
    return this.inner.size();
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    await this.inner.read(buf, offset);
    for (const p of this.patches) {
      const from = Math.max(p.offset, offset);
      const to = Math.min(p.offset + p.bytes.length, offset + buf.length);
      if (from < to) p.bytes.copy(buf, from - offset, from - p.offset, to - p.offset);
    }
  }

  async write(): Promise<void> {
    throw new Error(`${this.path} is read-only`);
  }

  sync(): Promise<void> {
    return this.inner.sync();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
