/**
 * Opening a file or block device for positional I/O, and the I/O loops around it. Shared by the
 * cache medium and the backing device, which sit at the same level and open devices alike.
 */
import { constants, promises as fsp, readSync, writeSync, writevSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { devMajorMinor, lockDescriptor, type LockMode } from './lock.js';

export { devMajorMinor };

export interface OpenDeviceOptions {
  /** Role for messages, e.g. 'cache device'. */
  what: string;
  readOnly?: boolean;
  /**
   * The OS lock to take on the descriptor (lock.ts): exclusive for an owner that writes, shared
   * for a reader; none when omitted. An exclusive lock needs the device open for writing.
   */
  lock?: LockMode;
}

export interface OpenedDevice {
  fh: FileHandle;
  /** Descriptors held only for their locks (the file behind a loop device); close them with fh. */
  extra: FileHandle[];
  size: number;
  isBlockDevice: boolean;
}

/**
 * A block device's size in bytes. fstat reports 0 for block devices and Node cannot issue the
 * BLKGETSIZE64 ioctl, so ask sysfs, which counts 512-byte sectors whatever the logical block size.
 */
export async function blockDeviceSize(rdev: bigint, sysRoot = '/sys'): Promise<number> {
  const { major, minor } = devMajorMinor(rdev);
  const file = `${sysRoot}/dev/block/${major}:${minor}/size`;
  const text = (await fsp.readFile(file, 'utf8')).trim();
  if (!/^\d+$/.test(text)) throw new Error(`${file}: unexpected content ${JSON.stringify(text)}`);
  const bytes = BigInt(text) * 512n;
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`${file}: device too large`);
  return Number(bytes);
}

/** Rejects requests outside the device: a file would silently grow or read short. */
export function checkRange(label: string, op: 'read' | 'write', offset: number, length: number, size: number): void {
  if (Number.isSafeInteger(offset) && offset >= 0 && offset + length <= size) return;
  throw Object.assign(
    new RangeError(`${label}: ${op} of ${length} bytes at offset ${offset} is outside the device (size ${size})`),
    { code: 'EINVAL' },
  );
}

export async function openDevice(path: string, opts: OpenDeviceOptions): Promise<OpenedDevice> {
  const label = `${opts.what} ${path}`;
  if (opts.lock === 'exclusive' && opts.readOnly) throw new Error(`${label}: an exclusive claim needs the device open for writing`);
  let st;
  try {
    st = await fsp.stat(path);
  } catch (err) {
    throw describeOpenError(err, label);
  }
  let flags = opts.readOnly ? constants.O_RDONLY : constants.O_RDWR;
  // On a block device O_EXCL without O_CREAT fails if anyone else holds it exclusively or has it mounted.
  if (st.isBlockDevice()) flags |= constants.O_EXCL;
  else if (!st.isFile()) throw new Error(`${label} is neither a regular file nor a block device`);

  let fh: FileHandle;
  try {
    fh = await fsp.open(path, flags);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EBUSY') {
      throw Object.assign(new Error(`${label} is busy: mounted, or opened exclusively by another program`), {
        code: 'EBUSY',
        cause: err,
      });
    }
    throw describeOpenError(err, label);
  }
  const extra: FileHandle[] = [];
  try {
    const fst = await fh.stat({ bigint: true });
    // The path may have been replaced between stat and open; only trust what the descriptor is.
    if (fst.isBlockDevice() !== st.isBlockDevice()) throw new Error(`${label} changed while being opened`);
    if (opts.lock) {
      await lockDescriptor(fh.fd, opts.lock, label);
      // A loop device is another name for its file: whoever has the file must see this claim too.
      const file = fst.isBlockDevice() ? await loopBackingFile(fst.rdev) : null;
      if (file) extra.push(await lockLoopFile(file, opts, label));
    }
    const size = fst.isBlockDevice() ? await blockDeviceSize(fst.rdev) : Number(fst.size);
    return { fh, size, isBlockDevice: fst.isBlockDevice(), extra };
  } catch (err) {
    for (const x of extra) await x.close().catch(() => undefined);
    await fh.close();
    throw err;
  }
}

/** The file behind a loop device, or null for any other block device. */
async function loopBackingFile(rdev: bigint, sysRoot = '/sys'): Promise<string | null> {
  const { major, minor } = devMajorMinor(rdev);
  try {
    const text = (await fsp.readFile(`${sysRoot}/dev/block/${major}:${minor}/loop/backing_file`, 'utf8')).trim();
    return text === '' ? null : text;
  } catch {
    return null;
  }
}

async function lockLoopFile(file: string, opts: OpenDeviceOptions, label: string): Promise<FileHandle> {
  // The kernel may report a file deleted since; then nobody else can open it by path either.
  const fh = await fsp.open(file, opts.lock === 'shared' ? constants.O_RDONLY : constants.O_RDWR);
  try {
    await lockDescriptor(fh.fd, opts.lock!, `${label} (a loop device over ${file})`);
    return fh;
  } catch (err) {
    await fh.close();
    throw err;
  }
}

/** One line for the user instead of a raw "ENOENT: no such file or directory, stat 'x'". */
function describeOpenError(err: unknown, label: string): Error {
  const code = (err as NodeJS.ErrnoException).code;
  const reason =
    code === 'ENOENT' ? 'no such file' : code === 'EACCES' || code === 'EPERM' ? 'permission denied' : code === 'ENOTDIR' ? 'a part of the path is not a directory' : null;
  if (reason === null) return err as Error;
  return Object.assign(new Error(`${label}: ${reason}`), { code, cause: err });
}

/** Creates a sparse regular file of `size` bytes unless `path` already exists (then it is left alone). */
export async function createIfMissing(path: string, size: number | undefined, label: string): Promise<void> {
  let fh: FileHandle;
  try {
    fh = await fsp.open(path, 'wx');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return;
    throw err;
  }
  try {
    if (size === undefined || !Number.isSafeInteger(size) || size < 0) {
      throw new Error(`${label}: creating it needs a size in bytes, got ${String(size)}`);
    }
    await fh.truncate(size);
    await fh.sync();
    await fh.close();
  } catch (err) {
    await fh.close().catch(() => {});
    await fsp.rm(path, { force: true });
    throw err;
  }
  // fdatasync of the file alone does not make a new directory entry durable.
  const dir = await fsp.open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

/** pread until `buf` is full; a short file is an error, never zeros. */
export async function readFully(fh: FileHandle, buf: Buffer, offset: number, label: string): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, offset + done);
    if (bytesRead === 0) {
      throw Object.assign(new Error(`${label}: unexpected end of data at offset ${offset + done}`), { code: 'EIO' });
    }
    done += bytesRead;
  }
}

/** pwrite/pwritev until every byte is written. */
export async function writeFully(fh: FileHandle, data: readonly Buffer[], offset: number, label: string): Promise<void> {
  const rest = data.filter((b) => b.length > 0);
  let pos = offset;
  while (rest.length > 0) {
    const first = rest[0]!;
    const { bytesWritten } =
      rest.length === 1 ? await fh.write(first, 0, first.length, pos) : await fh.writev(rest, pos);
    // A zero-byte write would otherwise spin here forever.
    if (bytesWritten <= 0) {
      throw Object.assign(new Error(`${label}: write made no progress at offset ${pos}`), { code: 'EIO' });
    }
    pos += bytesWritten;
    let n = bytesWritten;
    while (n > 0) {
      const head = rest[0]!;
      if (n >= head.length) {
        n -= head.length;
        rest.shift();
      } else {
        rest[0] = head.subarray(n);
        n = 0;
      }
    }
  }
}

export function asBuffers(data: Buffer | readonly Buffer[]): readonly Buffer[] {
  return Buffer.isBuffer(data) ? [data] : data;
}

export function totalLength(data: readonly Buffer[]): number {
  let n = 0;
  for (const b of data) n += b.length;
  return n;
}

/**
 * Requests up to this size are done synchronously (readAt, writeAt): a small pread/pwrite that hits
 * the page cache takes a few microseconds, less than the hop through libuv's thread pool and back,
 * which would otherwise dominate a 4 KiB request. Larger ones go through the pool so the event loop
 * never stalls behind a big copy. PCACHE_SYNC_IO_MAX=0 turns this off.
 */
export const SYNC_IO_MAX = Number(process.env.PCACHE_SYNC_IO_MAX ?? 64 * 1024);

/** readFully, done synchronously when `buf` is at most SYNC_IO_MAX bytes. */
export async function readAt(fh: FileHandle, buf: Buffer, offset: number, label: string): Promise<void> {
  if (buf.length > SYNC_IO_MAX) return readFully(fh, buf, offset, label);
  let done = 0;
  while (done < buf.length) {
    const n = readSync(fh.fd, buf, done, buf.length - done, offset + done);
    if (n === 0) throw Object.assign(new Error(`${label}: unexpected end of data at offset ${offset + done}`), { code: 'EIO' });
    done += n;
  }
}

/**
 * A vectored write of small buffers (requests gathered at the data head) stays synchronous up to
 * this size: it replaces that many small synchronous writes with one system call.
 */
const SYNC_GATHER_MAX = 16 * SYNC_IO_MAX;

/** writeFully, done synchronously when the data is at most SYNC_IO_MAX bytes, or small buffers gathered. */
export async function writeAt(fh: FileHandle, data: readonly Buffer[], offset: number, label: string): Promise<void> {
  const total = totalLength(data);
  const sync = total <= SYNC_IO_MAX || (data.length > 1 && total <= SYNC_GATHER_MAX && data.every((b) => b.length <= SYNC_IO_MAX));
  if (!sync) return writeFully(fh, data, offset, label);
  const n = data.length === 1 ? writeSync(fh.fd, data[0]!, 0, total, offset) : writevSync(fh.fd, data as Buffer[], offset);
  // A short write is finished the general way.
  if (n < total) await writeFully(fh, [Buffer.concat(data as Buffer[]).subarray(n)], offset + n, label);
}
