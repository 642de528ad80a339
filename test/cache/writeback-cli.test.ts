/**
 * `pcache writeback <cache-dev> <backing-dev>`, the offline drain, as a child process on sparse
 * files: on a dirty cache image written by the kernel's dm-pcache it leaves the backing device
 * equal to the kernel's own view of the device, and the cache clean; its errors are clear (those
 * run in process, through the same dispatcher, to keep the test short).
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readSync } from 'node:fs';
import { mkdtemp, open, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { openFileBacking } from '../../src/backing/file.js';
import { Cache } from '../../src/cache/cache.js';
import { samePosition } from '../../src/format/index.js';
import { openFileMedium } from '../../src/media/file.js';
import { runPcache, runPcacheInProcess } from '../helpers/cli.js';
import { FIXTURE_BACKING_SIZE, fixtureCopy, fixtureImage } from '../helpers/fixtures.js';
import { MiB } from './helpers.js';

/** Are two files equal, byte for byte? Read in chunks into reused buffers. */
function sameFiles(a: string, b: string): boolean {
  const fa = openSync(a, 'r');
  const fb = openSync(b, 'r');
  try {
    const ba = Buffer.allocUnsafe(4 * MiB);
    const bb = Buffer.allocUnsafe(4 * MiB);
    for (let off = 0; ; off += ba.length) {
      const na = readSync(fa, ba, 0, ba.length, off);
      const nb = readSync(fb, bb, 0, bb.length, off);
      if (na !== nb || !ba.subarray(0, na).equals(bb.subarray(0, nb))) return false;
      if (na === 0) return true;
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
}

async function sparseFile(path: string, size: number): Promise<string> {
  await writeFile(path, '');
  await truncate(path, size);
  return path;
}

let dir = '';
let dirty = '';
let backingPath = '';
after(() => rm(dir, { recursive: true, force: true }));

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'pcache-wb-cli-'));
  dirty = await fixtureCopy('kernel-dirty.img', join(dir, 'dirty.img'));
  backingPath = await sparseFile(join(dir, 'backing.img'), FIXTURE_BACKING_SIZE);
});

test('pcache writeback refuses what it cannot drain, with a clear message and a non-zero status', async () => {
  const blank = await sparseFile(join(dir, 'blank.img'), 512 * MiB);

  const usage = await runPcacheInProcess(['writeback', blank]);
  assert.equal(usage.code, 2);
  assert.match(usage.stderr, /missing the cache device and the backing device/);

  const missing = await runPcacheInProcess(['writeback', join(dir, 'nope.img'), backingPath]);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /^pcache: cache device .*nope\.img does not exist/);

  const noCache = await runPcacheInProcess(['writeback', blank, backingPath]);
  assert.equal(noCache.code, 1);
  assert.match(noCache.stderr, /^pcache: .*blank\.img holds no cache/);

  const noBacking = await runPcacheInProcess(['writeback', dirty, join(dir, 'missing-backing.img')]);
  assert.equal(noBacking.code, 1);
  assert.match(noBacking.stderr, /^pcache: backing device .*missing-backing\.img does not exist/);

  // Keys reach past a backing device that is too small: replay refuses the pair.
  const small = await sparseFile(join(dir, 'small.img'), 64 * MiB);
  const tooSmall = await runPcacheInProcess(['writeback', dirty, small]);
  assert.equal(tooSmall.code, 1);
  assert.match(tooSmall.stderr, /^pcache: .*dirty\.img: failed to replay keys/);

  // A cache device in use by another pcache is refused, and left alone.
  const medium = await openFileMedium(dirty);
  try {
    const busy = await runPcacheInProcess(['writeback', dirty, backingPath]);
    assert.equal(busy.code, 1);
    assert.match(busy.stderr, /busy|already open/i);
  } finally {
    await medium.close();
  }
});

test("pcache writeback drains the kernel's dirty cache image: the backing equals the kernel's device, the cache is clean", { timeout: 120_000 }, async () => {
  // Nothing was written back by the refused runs above: all 59 ksets are still dirty.
  const res = await runPcache(['writeback', dirty, backingPath]);
  assert.equal(res.code, 0, res.stderr);
  // The fixture's log: 59 ksets from 0:0 to 0:25216 (fixtures/README.md).
  assert.match(res.stdout, /wrote back 59 ksets, \d+ bytes .* dirty_tail 0:0 -> 0:25216, the cache is clean/);
  assert.match(res.stderr, /100%/, 'progress lines on a non-terminal stderr');
  assert.ok(sameFiles(backingPath, await fixtureImage('expected-device.bin')), 'the backing device equals expected-device.bin');

  // Again: nothing to do.
  const again = await runPcacheInProcess(['writeback', dirty, backingPath, '--quiet']);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stdout, /nothing to write back; the cache is clean \(dirty_tail = key_head = 0:25216\)/);
  assert.equal(again.stderr, '');

  // The cache it leaves opens clean and still serves the data.
  const medium = await openFileMedium(dirty);
  const backing = await openFileBacking(backingPath);
  const cache = await Cache.open(medium, backing, { formatIfBlank: false });
  assert.ok(samePosition(cache.dirtyTail, cache.keyHead));
  assert.equal(cache.status().dataCrc, true);
  const expected = Buffer.alloc(MiB);
  const fh = await open(await fixtureImage('expected-device.bin'), 'r');
  await fh.read(expected, 0, MiB, 8 * MiB);
  await fh.close();
  assert.ok((await cache.read(8 * MiB, MiB)).equals(expected));
  await cache.close();
  await medium.close();
  await backing.close();
});
