/** The cache device on a regular file or a block device. */
import type { FileHandle } from 'node:fs/promises';
import { asBuffers, checkRange, createIfMissing, openDevice, readAt, totalLength, writeAt } from './blockdev.js';
import { acquireDeviceLock, type DeviceLock } from './lock.js';
import type { Medium } from './medium.js';

export interface FileMediumOptions {
  /** Create a sparse file of `sizeIfCreate` bytes if the path does not exist; an existing file is opened as it is. */
  create?: boolean;
  sizeIfCreate?: number;
  readOnly?: boolean;
  /** Claim the device against other pcache instances (default true). */
  lock?: boolean;
}

export class FileMedium implements Medium {
  private closed = false;
  private readonly label: string;

  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    private readonly bytes: number,
    readonly isBlockDevice: boolean,
    readonly readOnly: boolean,
    private readonly lock: DeviceLock | null,
  ) {
    this.label = `cache device ${path}`;
  }

  static async open(path: string, opts: FileMediumOptions = {}): Promise<FileMedium> {
    // Taking the lock needs the path to exist, and creating is harmless to a running owner.
    let lock: DeviceLock | null = null;
    if (opts.create) await createIfMissing(path, opts.sizeIfCreate, `cache device ${path}`);
    if (opts.lock ?? true) lock = await acquireDeviceLock(path, 'cache device');
    try {
      const dev = await openDevice(path, { what: 'cache device', readOnly: opts.readOnly });
      return new FileMedium(path, dev.fh, dev.size, dev.isBlockDevice, opts.readOnly ?? false, lock);
    } catch (err) {
      await lock?.release();
      throw err;
    }
  }

  size(): number {
    return this.bytes;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.usable();
    checkRange(this.label, 'read', offset, buf.length, this.bytes);
    // Small reads synchronously: see SYNC_IO_MAX in blockdev.ts.
    await readAt(this.fh, buf, offset, this.label);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    this.usable();
    if (this.readOnly) throw Object.assign(new Error(`${this.label} is open read-only`), { code: 'EROFS' });
    const bufs = asBuffers(data);
    const total = totalLength(bufs);
    checkRange(this.label, 'write', offset, total, this.bytes);
    await writeAt(this.fh, bufs, offset, this.label);
  }

  async sync(): Promise<void> {
    this.usable();
    await this.fh.datasync();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.fh.close();
    } finally {
      await this.lock?.release();
    }
  }

  private usable(): void {
    if (this.closed) throw new Error(`${this.label} is closed`);
  }
}

export function openFileMedium(path: string, opts?: FileMediumOptions): Promise<FileMedium> {
  return FileMedium.open(path, opts);
}
