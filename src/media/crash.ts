/**
 * An in-memory cache device for crash and fault tests: it knows which writes a sync made
 * durable, can produce the image a power cut would leave, and can fail or park chosen I/O.
 */
import { asBuffers, checkRange, totalLength } from './blockdev.js';
import { GatedDevice } from './gate.js';
import type { Medium } from './medium.js';
import { VolatileImage } from './volatile.js';

export { seededRng } from './volatile.js';

export class CrashMedium extends GatedDevice implements Medium {
  private readonly img: VolatileImage;
  private closed = false;

  /** A zeroed medium of `size` bytes, or one whose durable contents start as a copy of `image`. */
  constructor(sizeOrImage: number | Buffer, readonly path = 'crash-medium') {
    super(path);
    const image = typeof sizeOrImage === 'number' ? Buffer.alloc(sizeOrImage) : Buffer.from(sizeOrImage);
    this.img = new VolatileImage(image, true);
  }

  size(): number {
    return this.img.current.length;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.usable();
    checkRange(this.path, 'read', offset, buf.length, this.size());
    await this.gate.pass('read', offset, buf.length);
    this.img.current.copy(buf, 0, offset, offset + buf.length);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    this.usable();
    const bufs = asBuffers(data);
    checkRange(this.path, 'write', offset, totalLength(bufs), this.size());
    // A copy: the record outlives the call, and the caller may reuse its buffers afterwards.
    const w = this.img.begin(offset, Buffer.concat(bufs));
    try {
      await this.gate.pass('write', offset, w.data.length);
    } catch (err) {
      this.img.drop(w);
      throw err;
    }
    this.img.land(w);
  }

  async sync(): Promise<void> {
    this.usable();
    const mark = this.img.mark();
    await this.gate.pass('flush', 0, 0);
    this.img.persist(mark);
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  /** The image a power cut now would leave (see VolatileImage.crash). */
  crash(rng: () => number): Buffer {
    return this.img.crash(rng);
  }

  /** A copy of what reads currently see. */
  image(): Buffer {
    return Buffer.from(this.img.current);
  }



  /** While on, sync() rejects with EIO and makes nothing durable. */
  failSyncs(on: boolean): void {
    this.gate.failFlushes(on);
  }


  private usable(): void {
    if (this.closed) throw new Error(`${this.path} is closed`);
  }
}
