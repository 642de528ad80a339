/**
 * A backing device in memory, for tests: it reports each operation as it completes, can fail
 * or park chosen I/O, and (with `crashable`) produce the image a power cut would leave.
 */
import { checkRange } from '../media/blockdev.js';
import { GatedDevice } from '../media/gate.js';
import { VolatileImage } from '../media/volatile.js';
import type { BackingDevice } from './backing.js';

export interface BackingOp {
  op: 'read' | 'write' | 'flush';
  offset: number;
  length: number;
  /** For writes, a copy of the data written. */
  data?: Buffer;
}

export interface MemoryBackingOptions {
  name?: string;
  onOp?: (op: BackingOp) => void;
  /** Track durability so crash() works; costs a second copy of the image plus every unflushed write. */
  crashable?: boolean;
}

export class MemoryBacking extends GatedDevice implements BackingDevice {
  readonly name: string;
  /** Called as each operation completes, in completion order. */
  onOp: ((op: BackingOp) => void) | undefined;
  private readonly img: VolatileImage;
  private closed = false;

  /** A zeroed device of `size` bytes, or one whose durable contents start as a copy of `image`. */
  constructor(sizeOrImage: number | Buffer, opts: MemoryBackingOptions = {}) {
    super(opts.name ?? 'memory');
    const image = typeof sizeOrImage === 'number' ? Buffer.alloc(sizeOrImage) : Buffer.from(sizeOrImage);
    this.name = opts.name ?? 'memory';
    this.onOp = opts.onOp;
    this.img = new VolatileImage(image, opts.crashable ?? false);
  }

  size(): number {
    return this.img.current.length;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.usable();
    checkRange(this.name, 'read', offset, buf.length, this.size());
    await this.gate.pass('read', offset, buf.length);
    this.img.current.copy(buf, 0, offset, offset + buf.length);
    this.onOp?.({ op: 'read', offset, length: buf.length });
  }

  async write(data: Buffer, offset: number): Promise<void> {
    this.usable();
    checkRange(this.name, 'write', offset, data.length, this.size());
    const w = this.img.begin(offset, Buffer.from(data));
    try {
      await this.gate.pass('write', offset, data.length);
    } catch (err) {
      this.img.drop(w);
      throw err;
    }
    this.img.land(w);
    this.onOp?.({ op: 'write', offset, length: w.data.length, data: Buffer.from(w.data) });
  }

  async flush(): Promise<void> {
    this.usable();
    const mark = this.img.mark();
    await this.gate.pass('flush', 0, 0);
    this.img.persist(mark);
    this.onOp?.({ op: 'flush', offset: 0, length: 0 });
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  /** A copy of what reads currently see. */
  image(): Buffer {
    return Buffer.from(this.img.current);
  }

  /** The image a power cut now would leave; needs `crashable`. */
  crash(rng: () => number): Buffer {
    return this.img.crash(rng);
  }



  /** While on, flush() rejects with EIO and makes nothing durable. */
  failFlushes(on: boolean): void {
    this.gate.failFlushes(on);
  }


  private usable(): void {
    if (this.closed) throw new Error(`${this.name} is closed`);
  }
}
