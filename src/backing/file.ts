/** The backing device on a regular file or a block device. */
import type { FileHandle } from 'node:fs/promises';
import { checkRange, createIfMissing, openDevice, readFully, writeFully } from '../media/blockdev.js';
import type { BackingDevice } from './backing.js';

export interface FileBackingOptions {
  /** Create a sparse file of `size` bytes if the path does not exist; an existing file is opened as it is. */
  create?: boolean;
  size?: number;
}

export class FileBacking implements BackingDevice {
  private closed = false;
  private readonly label: string;

  private constructor(
    readonly name: string,
    private readonly fh: FileHandle,
    private readonly bytes: number,
    readonly isBlockDevice: boolean,
  ) {
    this.label = `backing device ${name}`;
  }

  static async open(path: string, opts: FileBackingOptions = {}): Promise<FileBacking> {
    if (opts.create) await createIfMissing(path, opts.size, `backing device ${path}`);
    const dev = await openDevice(path, { what: 'backing device' });
    return new FileBacking(path, dev.fh, dev.size, dev.isBlockDevice);
  }

  size(): number {
    return this.bytes;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.usable();
    checkRange(this.label, 'read', offset, buf.length, this.bytes);
    await readFully(this.fh, buf, offset, this.label);
  }

  async write(data: Buffer, offset: number): Promise<void> {
    this.usable();
    checkRange(this.label, 'write', offset, data.length, this.bytes);
    await writeFully(this.fh, [data], offset, this.label);
  }

  async flush(): Promise<void> {
    this.usable();
    await this.fh.datasync();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }

  private usable(): void {
    if (this.closed) throw new Error(`${this.label} is closed`);
  }
}

export function openFileBacking(path: string, opts?: FileBackingOptions): Promise<FileBacking> {
  return FileBacking.open(path, opts);
}
