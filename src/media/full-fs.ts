/**
 * A test device: a sparse cache file on a filesystem that can fill up, as a sparse file on a
 * small tmpfs behaves. A page of the file takes a block of the filesystem the first time it is
 * written (zeros too); a write that needs more blocks than are free fails whole with ENOSPC, and
 * writes over pages that have their blocks always succeed. `setFree` makes room, or takes it.
 */
import { asBuffers, checkRange, totalLength } from './blockdev.js';
import type { Medium } from './medium.js';
import { PAGE, PageImage } from './sparse.js';

export class FullFsMedium implements Medium {
  private readonly image: PageImage;
  private readonly allocated: Uint8Array;
  private freePages: number;
  private closed = false;
  /** Writes refused for space so far. */
  enospc = 0;

  constructor(
    size: number,
    freeBytes: number,
    readonly path = 'full-fs',
  ) {
    this.image = new PageImage(size);
    this.allocated = new Uint8Array(Math.ceil(size / PAGE));
    this.freePages = Math.floor(freeBytes / PAGE);
  }

  /** Pages of the file that have blocks. */
  get allocatedBytes(): number {
    let n = 0;
    for (const a of this.allocated) n += a;
    return n * PAGE;
  }

  get freeBytes(): number {
    return this.freePages * PAGE;
  }

  /** The filesystem's free space is now `bytes` (another file was deleted, or grew). */
  setFree(bytes: number): void {
    this.freePages = Math.floor(bytes / PAGE);
  }

  size(): number {
    return this.image.size;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.usable();
    checkRange(this.path, 'read', offset, buf.length, this.image.size);
    this.image.read(buf, offset);
  }

  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    this.usable();
    const bufs = asBuffers(data);
    const len = totalLength(bufs);
    checkRange(this.path, 'write', offset, len, this.image.size);
    const first = Math.floor(offset / PAGE);
    const last = Math.floor((offset + len - 1) / PAGE);
    let need = 0;
    for (let p = first; p <= last && len > 0; p++) need += this.allocated[p] ? 0 : 1;
    if (need > this.freePages) {
      this.enospc++;
      throw Object.assign(new Error(`${this.path}: write of ${len} bytes at offset ${offset}: ENOSPC: no space left on device`), { code: 'ENOSPC' });
    }
    for (let p = first; p <= last && len > 0; p++) this.allocated[p] = 1;
    this.freePages -= need;
    let at = offset;
    for (const b of bufs) {
      this.image.write(b, at);
      at += b.length;
    }
  }

  async sync(): Promise<void> {
    this.usable();
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  private usable(): void {
    if (this.closed) throw new Error(`${this.path} is closed`);
  }
}
