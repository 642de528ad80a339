/** The cache device on a regular file or a block device. */
import { readSync, writeSync, writevSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { asBuffers, checkRange, createIfMissing, openDevice, readFully, totalLength, writeFully } from './blockdev.js';
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

/**
 * Requests up to this size are done synchronously: a small pread/pwrite that hits the page cache
 * takes a few microseconds, less than the hop through libuv's thread pool and back, which would
 * otherwise dominate a 4 KiB request. Larger ones go through the pool so the event loop never
 * stalls behind a big copy. PCACHE_SYNC_IO_MAX=0 turns this off.
 */
const SYNC_IO_MAX = Number(process.env.PCACHE_SYNC_IO_MAX ?? 64 * 1024);

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
    if (buf.length <= SYNC_IO_MAX) {
      let done = 0;
      while (done < buf.length) {
        const n = readSync(this.fh.fd, buf, done, buf.length - done, offset + done);
        if (n === 0) throw Object.assign(new Error(`${this.label}: unexpected end of data at offset ${offset + done}`), { code: 'EIO' });
        done += n;
      }
      return;
    }
    await readFully(this.fh, buf, offset, this.label);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    this.usable();
    if (this.readOnly) throw Object.assign(new Error(`${this.label} is open read-only`), { code: 'EROFS' });
    const bufs = asBuffers(data);
    const total = totalLength(bufs);
    checkRange(this.label, 'write', offset, total, this.bytes);
    if (total <= SYNC_IO_MAX) {
      const n = bufs.length === 1 ? writeSync(this.fh.fd, bufs[0]!, 0, total, offset) : writevSync(this.fh.fd, bufs as Buffer[], offset);
      // A short write is finished the general way.
      if (n < total) await writeFully(this.fh, [Buffer.concat(bufs as Buffer[]).subarray(n)], offset + n, this.label);
      return;
    }
    await writeFully(this.fh, bufs, offset, this.label);
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
