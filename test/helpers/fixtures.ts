/**
 * The kernel-written golden images of test/fixtures/kernel (copied byte for byte from the
 * project's shared fixtures, see SOURCE.md there), decompressed for tests.
 *
 * Each image is inflated once into a cache directory under the system temp dir, sparsely (all-zero
 * 64 KiB blocks are skipped, so a 1 GiB image costs a few MiB of disk), and reused by every later
 * test and test run. Cached images are made read-only: a test that writes must take a copy with
 * fixtureCopy. Missing fixtures fail loudly: the repository carries them, so their absence is a broken checkout.
 */
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, statSync } from 'node:fs';
import { chmod, mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { createGunzip } from 'node:zlib';
import { REPO_ROOT } from './cli.js';

/** Uncompressed sizes, from the fixtures README. */
export const FIXTURE_SIZES = {
  'kernel-fresh-crc.img': 1073741824,
  'kernel-fresh-nocrc.img': 1073741824,
  'kernel-dirty.img': 1073741824,
  'kernel-dirty.backing.img': 268435456,
  'kernel-written-back.img': 1073741824,
  'kernel-written-back.backing.img': 268435456,
  'expected-device.bin': 268435456,
  'kernel-partial-wb-crc.img': 1073741824,
} as const;

export type FixtureName = keyof typeof FIXTURE_SIZES;

/** Every kernel cache image (not the backing or expected-content files). */
export const KERNEL_CACHE_IMAGES: readonly FixtureName[] = [
  'kernel-fresh-crc.img',
  'kernel-fresh-nocrc.img',
  'kernel-dirty.img',
  'kernel-written-back.img',
  'kernel-partial-wb-crc.img',
];

/** The backing device size of every fixture (a 256 MiB virtio disk). */
export const FIXTURE_BACKING_SIZE = 256 * 1024 * 1024;

export interface Patch {
  offset: number;
  bytes: Buffer;
}

/** The repository's own copy of the kernel images; a clone anywhere tests itself. */
export const REPO_FIXTURES = join(REPO_ROOT, 'test', 'fixtures', 'kernel');

/** $PCACHE_FIXTURES (the fixtures directory or a directory holding `fixtures/`) overrides the repository's copy. */
export function fixturesDir(): string {
  const env = process.env.PCACHE_FIXTURES;
  const candidates = env ? [join(env, 'fixtures'), env] : [REPO_FIXTURES];
  for (const dir of candidates) {
    if (existsSync(join(dir, 'kernel-dirty.img.gz'))) return dir;
  }
  throw new Error(
    `the kernel fixtures are missing: no kernel-dirty.img.gz in ${candidates.join(' or ')} ` +
      '(set PCACHE_FIXTURES to the directory that holds them)',
  );
}

function gzPath(name: FixtureName): string {
  const path = join(fixturesDir(), `${name}.gz`);
  if (!existsSync(path)) throw new Error(`fixture ${path} is missing`);
  return path;
}

function cacheDir(): string {
  let user = 'user';
  try {
    user = userInfo().username;
  } catch {
    // No passwd entry (some containers): one shared name is still fine.
  }
  return join(tmpdir(), `pcache-fixtures-${user}`);
}

async function gzTag(path: string): Promise<string> {
  // Hashing the small compressed file keys the cache to the fixture's content, not its mtime.
  return createHash('sha256').update(await readFile(path)).digest('hex').slice(0, 16);
}

const BLOCK = 64 * 1024;

/**
 * Inflate `src` into `dest` without writing all-zero blocks, then set the full size. Patches
 * are applied on the way. The length must come out as the README says.
 */
async function inflateSparse(src: string, dest: string, expected: number, patches: readonly Patch[]): Promise<void> {
  const fh = await open(dest, 'w', 0o644);
  try {
    const zero = Buffer.alloc(BLOCK);
    const carry = Buffer.alloc(BLOCK);
    let carried = 0;
    let pos = 0;
    const flush = async (block: Buffer, at: number): Promise<void> => {
      for (const p of patches) {
        const from = Math.max(p.offset, at);
        const to = Math.min(p.offset + p.bytes.length, at + block.length);
        if (from < to) p.bytes.copy(block, from - at, from - p.offset, to - p.offset);
      }
      if (!block.equals(zero.subarray(0, block.length))) await fh.write(block, 0, block.length, at);
    };
    const stream = createReadStream(src).pipe(createGunzip({ chunkSize: 1024 * 1024 }));
    for await (const chunk of stream as AsyncIterable<Buffer>) {
      let i = 0;
      if (carried > 0) {
        const n = Math.min(BLOCK - carried, chunk.length);
        chunk.copy(carry, carried, 0, n);
        carried += n;
        i = n;
        if (carried === BLOCK) {
          await flush(carry, pos);
          pos += BLOCK;
          carried = 0;
        }
      }
      for (; i + BLOCK <= chunk.length; i += BLOCK) {
        await flush(chunk.subarray(i, i + BLOCK), pos);
        pos += BLOCK;
      }
      if (i < chunk.length) {
        chunk.copy(carry, 0, i);
        carried = chunk.length - i;
      }
    }
    if (carried > 0) {
      await flush(carry.subarray(0, carried), pos);
      pos += carried;
    }
    if (pos !== expected) throw new Error(`${src} inflated to ${pos} bytes, expected ${expected}`);
    await fh.truncate(expected);
  } finally {
    await fh.close();
  }
}

const pending = new Map<string, Promise<string>>();

/**
 * The path of the decompressed fixture `name`, shared and read-only. Concurrent test processes
 * may both inflate it; each writes a private temporary file and renames it into place, so
 * readers only ever see a complete image.
 */
export function fixtureImage(name: FixtureName): Promise<string> {
  let p = pending.get(name);
  if (!p) {
    p = (async () => {
      const src = gzPath(name);
      const dir = cacheDir();
      await mkdir(dir, { recursive: true });
      const dest = join(dir, `${name}-${await gzTag(src)}`);
      const size = FIXTURE_SIZES[name];
      if (existsSync(dest) && statSync(dest).size === size) return dest;
      const tmp = `${dest}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
      try {
        await inflateSparse(src, tmp, size, []);
        await chmod(tmp, 0o444);
        await rename(tmp, dest);
      } finally {
        await rm(tmp, { force: true });
      }
      return dest;
    })();
    pending.set(name, p);
    p.catch(() => pending.delete(name));
  }
  return p;
}

/** A private, writable, sparse copy of fixture `name` at `dest`, with `patches` applied. */
export async function fixtureCopy(name: FixtureName, dest: string, patches: readonly Patch[] = []): Promise<string> {
  await inflateSparse(gzPath(name), dest, FIXTURE_SIZES[name], patches);
  return dest;
}

/** Bytes actually stored for a file (to confirm a copy stayed sparse). */
export async function allocatedBytes(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}
