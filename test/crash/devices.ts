/**
 * A crash-simulating backing device on sparse copy-on-write pages: the backing-device twin of
 * SparseCrashMedium. Writes since the last flush may be lost or torn by crash(); onIssue sees
 * every I/O as it is issued; kill() cuts the power for an abandoned engine.
 */
import type { BackingDevice } from '../../src/backing/backing.js';
import { checkRange } from '../../src/media/blockdev.js';
import { Gate, ioError, type HoldController, type IoOp, type IoPredicate } from '../../src/media/gate.js';
import type { IssuedIo } from '../../src/media/sparse-crash.js';
import { PageImage, SparseVolatileImage, type CrashOptions } from '../../src/media/sparse.js';

export class SparseCrashBacking implements BackingDevice {
  readonly gate: Gate;
  private readonly img: SparseVolatileImage;
  private closed = false;
  private dead = false;
  onIssue: ((io: IssuedIo) => void) | undefined;
  readonly issued = { read: 0, write: 0, flush: 0 };
  /** Every access outside the device, as the engine issued it (the device also rejects it). */
  readonly violations: string[] = [];

  constructor(
    base: PageImage,
    readonly name = 'sparse-crash-backing',
  ) {
    this.img = new SparseVolatileImage(base);
    this.gate = new Gate(name);
  }

  size(): number {
    return this.img.size;
  }

  private bounds(op: 'read' | 'write', offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || offset + length > this.size()) {
      this.violations.push(`${op} of ${length} bytes at ${offset}`);
    }
    checkRange(this.name, op, offset, length, this.size());
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.usable('read', offset, buf.length);
    this.bounds('read', offset, buf.length);
    this.issued.read++;
    this.onIssue?.({ op: 'read', offset, length: buf.length });
    await this.gate.pass('read', offset, buf.length);
    this.usable('read', offset, buf.length);
    this.img.current.read(buf, offset);
  }

  async write(data: Buffer, offset: number): Promise<void> {
    this.usable('write', offset, data.length);
    this.bounds('write', offset, data.length);
    this.issued.write++;
    const w = this.img.begin(offset, Buffer.from(data));
    try {
      this.onIssue?.({ op: 'write', offset, length: data.length, data: w.data });
      await this.gate.pass('write', offset, data.length);
      this.usable('write', offset, data.length);
    } catch (err) {
      this.img.drop(w);
      throw err;
    }
    this.img.land(w);
  }

  async flush(): Promise<void> {
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

  crash(rng: () => number, opts?: CrashOptions): PageImage {
    return this.img.crash(rng, opts);
  }

  /** What reads see now, as a copy-on-write clone. */
  image(): PageImage {
    return this.img.current.clone();
  }

  /** Has the page (of PAGE bytes) at `index` ever been written? If not it holds the initial content. */
  written(index: number): boolean {
    return this.img.current.written(index);
  }

  /** Read what the device holds now, without the gate (for checks). */
  peek(buf: Buffer, offset: number): void {
    this.img.current.read(buf, offset);
  }

  kill(): void {
    this.dead = true;
  }

  failReads(pred: IoPredicate | null): void {
    this.gate.failReads(pred);
  }

  failWrites(pred: IoPredicate | null): void {
    this.gate.failWrites(pred);
  }

  failFlushes(on: boolean): void {
    this.gate.failFlushes(on);
  }

  hold(pred: IoPredicate, ops?: readonly IoOp[]): HoldController {
    return this.gate.hold(pred, ops);
  }

  private usable(op: IoOp, offset: number, length: number): void {
    if (this.closed) throw new Error(`${this.name} is closed`);
    if (this.dead) throw ioError(this.name, op, offset, length);
  }
}

/**
 * A backing device on a PageImage that answers at once (no event-loop trip) and records any
 * access outside the device: for fuzz loops that open thousands of caches.
 */
export class PageBacking implements BackingDevice {
  readonly violations: string[] = [];
  private closed = false;

  constructor(
    readonly image: PageImage,
    readonly name = 'page-backing',
  ) {}

  size(): number {
    return this.image.size;
  }

  private bounds(op: 'read' | 'write', offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || offset + length > this.size()) {
      this.violations.push(`${op} of ${length} bytes at ${offset}`);
    }
    checkRange(this.name, op, offset, length, this.size());
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    if (this.closed) throw new Error(`${this.name} is closed`);
    this.bounds('read', offset, buf.length);
    this.image.read(buf, offset);
  }

  async write(data: Buffer, offset: number): Promise<void> {
    if (this.closed) throw new Error(`${this.name} is closed`);
    this.bounds('write', offset, data.length);
    this.image.write(data, offset);
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    this.closed = true;
  }
}
