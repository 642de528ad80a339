import type { BackingDevice } from '../../src/backing/backing.js';
import { checkRange } from '../../src/media/blockdev.js';
import { SparseCrashMedium } from '../../src/media/sparse-crash.js';
import type { PageImage } from '../../src/media/sparse.js';

/**
 * A crash-simulating backing device on sparse copy-on-write pages: SparseCrashMedium (writes since
 * the last flush may be lost or torn by crash(); onIssue sees every I/O as it is issued; kill()
 * cuts the power for an abandoned engine) behind the backing-device interface, recording any
 * access the engine makes outside the device.
 */
export class SparseCrashBacking extends SparseCrashMedium implements BackingDevice {
  /** Every access outside the device, as the engine issued it (the device also rejects it). */
  readonly violations: string[] = [];

  constructor(
    base: PageImage,
    readonly name = 'sparse-crash-backing',
  ) {
    super(base, name);
  }

  override read(buf: Buffer, offset: number): Promise<void> {
    recordViolation(this.violations, 'read', offset, buf.length, this.size());
    return super.read(buf, offset);
  }

  override write(data: Buffer, offset: number): Promise<void> {
    recordViolation(this.violations, 'write', offset, data.length, this.size());
    return super.write(data, offset);
  }

  flush(): Promise<void> {
    return this.sync();
  }

  failFlushes(on: boolean): void {
    this.failSyncs(on);
  }

  /** Has the page (of PAGE bytes) at `index` ever been written? If not it holds the initial content. */
  written(index: number): boolean {
    return this.img.current.written(index);
  }

  /** Read what the device holds now, without the gate (for checks). */
  peek(buf: Buffer, offset: number): void {
    this.img.current.read(buf, offset);
  }
}

function recordViolation(violations: string[], op: 'read' | 'write', offset: number, length: number, size: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || offset + length > size) {
    violations.push(`${op} of ${length} bytes at ${offset}`);
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
    recordViolation(this.violations, op, offset, length, this.size());
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
