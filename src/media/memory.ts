/** A cache device in memory, for tests. */
import { asBuffers, checkRange, totalLength } from './blockdev.js';
import { settle } from './gate.js';
import type { Medium } from './medium.js';

export class MemoryMedium implements Medium {
  private readonly store: Buffer;
  private closed = false;

  /** A zeroed medium of `size` bytes, or one starting as a copy of `image`. */
  constructor(sizeOrImage: number | Buffer, readonly path = 'memory') {
    this.store = typeof sizeOrImage === 'number' ? Buffer.alloc(sizeOrImage) : Buffer.from(sizeOrImage);
  }

  size(): number {
    return this.store.length;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.usable();
    checkRange(this.path, 'read', offset, buf.length, this.store.length);
    await settle();
    this.store.copy(buf, 0, offset, offset + buf.length);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    this.usable();
    const bufs = asBuffers(data);
    checkRange(this.path, 'write', offset, totalLength(bufs), this.store.length);
    await settle();
    let pos = offset;
    for (const b of bufs) pos += b.copy(this.store, pos);
  }

  async sync(): Promise<void> {
    this.usable();
    await settle();
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  /** A copy of the contents. */
  image(): Buffer {
    return Buffer.from(this.store);
  }

  private usable(): void {
    if (this.closed) throw new Error(`${this.path} is closed`);
  }
}
