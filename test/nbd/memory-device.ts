import type { BlockDevice } from '../../src/cache/block-device.js';

export interface MemoryDeviceFaults {
  /** Return an error to fail a read of this range. */
  read?: (offset: number, length: number) => Error | undefined;
  write?: (offset: number, length: number) => Error | undefined;
  /** Milliseconds each call waits before completing (lets tests force out-of-order replies). */
  delay?: (op: 'read' | 'write' | 'zero' | 'flush', offset: number, length: number) => number;
}

/** A RAM-backed BlockDevice for tests. */
export class MemoryDevice implements BlockDevice {
  readonly data: Buffer;
  faults: MemoryDeviceFaults = {};
  readonly calls = { read: 0, write: 0, zero: 0, flush: 0, fua: 0 };

  constructor(size: number) {
    this.data = Buffer.alloc(size);
  }

  size(): number {
    return this.data.length;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.calls.read++;
    await this.wait('read', offset, length);
    this.check(offset, length);
    const err = this.faults.read?.(offset, length);
    if (err) throw err;
    // A copy, so later writes cannot change data that is still being sent.
    const out = Buffer.allocUnsafe(length);
    this.data.copy(out, 0, offset, offset + length);
    return out;
  }

  async write(offset: number, data: Buffer, opts?: { fua?: boolean }): Promise<void> {
    this.calls.write++;
    if (opts?.fua) this.calls.fua++;
    await this.wait('write', offset, data.length);
    this.check(offset, data.length);
    const err = this.faults.write?.(offset, data.length);
    if (err) throw err;
    data.copy(this.data, offset);
  }

  async writeZeroes(offset: number, length: number, opts?: { fua?: boolean }): Promise<void> {
    this.calls.zero++;
    if (opts?.fua) this.calls.fua++;
    await this.wait('zero', offset, length);
    this.check(offset, length);
    this.data.fill(0, offset, offset + length);
  }

  async flush(): Promise<void> {
    this.calls.flush++;
    await this.wait('flush', 0, 0);
  }

  private check(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.data.length) {
      throw Object.assign(new Error(`out of range ${offset}+${length}`), { code: 'EINVAL' });
    }
  }

  private async wait(op: 'read' | 'write' | 'zero' | 'flush', offset: number, length: number): Promise<void> {
    const ms = this.faults.delay?.(op, offset, length) ?? 0;
    if (ms > 0) await new Promise((r) => setTimeout(r, ms));
  }
}

export function ioError(message = 'injected I/O error'): Error {
  return Object.assign(new Error(message), { code: 'EIO' });
}
