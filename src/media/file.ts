/** The cache device on a regular file or a block device. */
import type { FileHandle } from 'node:fs/promises';
import { asBuffers, checkRange, createIfMissing, openDevice, readAt, totalLength, writeAt } from './blockdev.js';
import { allocateFile } from './space.js';
import type { Medium } from './medium.js';

export interface FileMediumOptions {
  /** Create a sparse file of `sizeIfCreate` bytes if the path does not exist; an existing file is opened as it is. */
  create?: boolean;
  sizeIfCreate?: number;
  readOnly?: boolean;
  /**
   * Claim the device with an OS lock on its descriptor (default true): exclusive when open for
   * writing, shared when read-only, so readers may share it and nobody shares it with a writer.
   */
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
    /** Held only for their locks (the file behind a loop device). */
    private readonly extra: readonly FileHandle[],
  ) {
    this.label = `cache device ${path}`;
  }

  static async open(path: string, opts: FileMediumOptions = {}): Promise<FileMedium> {
    if (opts.create) await createIfMissing(path, opts.sizeIfCreate, `cache device ${path}`);
    const lock = (opts.lock ?? true) ? (opts.readOnly ? 'shared' : 'exclusive') : undefined;
    const dev = await openDevice(path, { what: 'cache device', readOnly: opts.readOnly, lock });
    return new FileMedium(path, dev.fh, dev.size, dev.isBlockDevice, opts.readOnly ?? false, dev.extra);
  }

  /**
   * Give a regular file all its blocks now (fallocate), so that no later write can fail for
   * space; a block device has them already.
   */
  async allocate(): Promise<void> {
    this.usable();
    if (this.isBlockDevice) return;
    await allocateFile(this.fh.fd, this.bytes, this.label);
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
      for (const x of this.extra) await x.close().catch(() => undefined);
    }
  }

  private usable(): void {
    if (this.closed) throw new Error(`${this.label} is closed`);
  }
}

export function openFileMedium(path: string, opts?: FileMediumOptions): Promise<FileMedium> {
  return FileMedium.open(path, opts);
}
