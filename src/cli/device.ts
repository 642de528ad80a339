import { promises as fsp } from 'node:fs';
import { openFileMedium, type FileMedium } from '../media/file.js';
import { CliError } from './errors.js';

/**
 * Open an existing cache device. A missing path gets its own message: pcache never creates a
 * cache device by itself (a mistyped path must not become a new file).
 */
export async function openCacheDevice(path: string, opts: { readOnly: boolean }): Promise<FileMedium> {
  try {
    await fsp.stat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new CliError(`cache device ${path} does not exist (for a file, create it first, e.g. truncate -s 1G ${path})`);
    }
    throw err;
  }
  return openFileMedium(path, { readOnly: opts.readOnly });
}

/** Run `fn` on the open device and always close it. */
export async function withCacheDevice<T>(path: string, opts: { readOnly: boolean }, fn: (m: FileMedium) => Promise<T>): Promise<T> {
  const medium = await openCacheDevice(path, opts);
  try {
    return await fn(medium);
  } finally {
    await medium.close();
  }
}
