/** The backing device on a regular file or a block device. */
import type { FileHandle } from 'node:fs/promises';
import { checkRange, createIfMissing, openDevice, readFully, writeAt } from '../media/blockdev.js';
import type { BackingDevice } from './backing.js';

export interface FileBackingOptions {
  /** Create a sparse file of `size` bytes if the path does not exist; an existing file is opened as it is. */
  create?: boolean;
  size?: number;
  /**
   * Claim the device with an exclusive OS lock (default true): a second cache over the same
   * backing device would write back over the first one's data.
   */
  lock?: boolean;
}

export class FileBacking implements BackingDevice {
  private closed = false;
  private readonly label: string;

  private constructor(
    readonly name: string,
    private readonly fh: FileHandle,
    private readonly bytes: number,
    readonly isBlockDevice: boolean,
    /** Held only for their locks (the file behind a loop device). */
    private readonly extra: readonly FileHandle[],
  ) {
    this.label = `backing device ${name}`;
  }

  static async open(path: string, opts: FileBackingOptions = {}): Promise<FileBacking> {
    if (opts.create) await createIfMissing(path, opts.size, `backing device ${path}`);
    const dev = await openDevice(path, { what: 'backing device', lock: (opts.lock ?? true) ? 'exclusive' : undefined });
    return new FileBacking(path, dev.fh, dev.size, dev.isBlockDevice, dev.extra);
  }

  size(): number {
    return this.bytes;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.usable();
    checkRange(this.label, 'read', offset, buf.length, this.bytes);
    // Reads stay asynchronous, unlike writes: they are the cache misses, and on a slow disk a
    // synchronous one would stall the event loop (every hit, every other miss) for a seek.
    await readFully(this.fh, buf, offset, this.label);
  }

  async write(data: Buffer, offset: number): Promise<void> {
    this.usable();
    checkRange(this.label, 'write', offset, data.length, this.bytes);
    // Small writes synchronously (see SYNC_IO_MAX): they land in the page cache, and write-back of
    // 4 KiB keys would otherwise spend most of its copy on the thread-pool hop.
    await writeAt(this.fh, [data], offset, this.label);
  }

  async flush(): Promise<void> {
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

export function openFileBacking(path: string, opts?: FileBackingOptions): Promise<FileBacking> {
  return FileBacking.open(path, opts);
}
