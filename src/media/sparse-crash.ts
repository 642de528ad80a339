/**
 * CrashMedium on sparse copy-on-write pages: the same durability model (see CrashMedium and
 * SparseVolatileImage), but a 512 MiB device costs only the pages written, and a crash image
 * costs a page-map copy. It also lets a test see every I/O as it is issued (to stop the world at
 * a chosen moment: inside a kset write, a tail update, a generation bump) and kill the device so
 * that an abandoned engine cannot touch it any more.
 */
import { asBuffers, checkRange, totalLength } from './blockdev.js';
import { GatedDevice, ioError, type IoOp } from './gate.js';
import type { Medium } from './medium.js';
import { PageImage, SparseVolatileImage, type CrashOptions } from './sparse.js';

/** An I/O as issued: for a write, `data` is what it will write (do not change it). */
export interface IssuedIo {
  op: IoOp;
  offset: number;
  length: number;
  data?: Buffer;
}

export class SparseCrashMedium extends GatedDevice implements Medium {
  protected readonly img: SparseVolatileImage;
  private closed = false;
  private dead = false;
  /** Sees every I/O when it is issued, before it takes effect; a write is already in flight then. */
  onIssue: ((io: IssuedIo) => void) | undefined;
  /** I/Os issued so far, by kind. */
  readonly issued = { read: 0, write: 0, flush: 0 };

  /** A zeroed medium of `size` bytes, or one whose durable contents start as `base` (not changed). */
  constructor(sizeOrBase: number | PageImage, readonly path = 'sparse-crash-medium') {
    super(path);
    this.img = new SparseVolatileImage(typeof sizeOrBase === 'number' ? new PageImage(sizeOrBase) : sizeOrBase);
  }

  size(): number {
    return this.img.size;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.usable('read', offset, buf.length);
    checkRange(this.path, 'read', offset, buf.length, this.size());
    this.issued.read++;
    this.onIssue?.({ op: 'read', offset, length: buf.length });
    await this.gate.pass('read', offset, buf.length);
    this.usable('read', offset, buf.length);
    this.img.current.read(buf, offset);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    const bufs = asBuffers(data);
    const len = totalLength(bufs);
    this.usable('write', offset, len);
    checkRange(this.path, 'write', offset, len, this.size());
    this.issued.write++;
    // A copy: the record outlives the call, and the caller may reuse its buffers afterwards.
    const w = this.img.begin(offset, Buffer.concat(bufs));
    try {
      this.onIssue?.({ op: 'write', offset, length: len, data: w.data });
      await this.gate.pass('write', offset, len);
      this.usable('write', offset, len);
    } catch (err) {
      this.img.drop(w);
      throw err;
    }
    this.img.land(w);
  }

  async sync(): Promise<void> {
    this.usable('flush', 0, 0);
    this.issued.flush++;
    const mark = this.img.mark();
    this.onIssue?.({ op: 'flush', offset: 0, length: 0 });
    await this.gate.pass('flush', 0, 0);
    this.usable('flush', 0, 0);
    this.img.persist(mark);
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  /** The image a power cut now would leave (see SparseVolatileImage.crash). */
  crash(rng: () => number, opts?: CrashOptions): PageImage {
    return this.img.crash(rng, opts);
  }

  /** What reads currently see, as a copy-on-write clone. */
  image(): PageImage {
    return this.img.current.clone();
  }

  /** Writes no sync has covered yet. */
  get unsynced(): number {
    return this.img.unsynced;
  }

  /**
   * The power is cut: from now on every I/O, including those already parked or in flight,
   * rejects with EIO and changes nothing.
   */
  kill(): void {
    this.dead = true;
  }

  get killed(): boolean {
    return this.dead;
  }



  failSyncs(on: boolean): void {
    this.gate.failFlushes(on);
  }


  private usable(op: IoOp, offset: number, length: number): void {
    if (this.closed) throw new Error(`${this.path} is closed`);
    if (this.dead) throw ioError(this.path, op, offset, length);
  }
}
