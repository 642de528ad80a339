/**
 * Options persisted in cache_info: reopening with another data_crc or cache_mode fails with
 * dm-pcache's message and writes nothing; gc_percent persists and changes while running.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Cache } from '../../src/cache/cache.js';
import { CacheError } from '../../src/cache/errors.js';
import { flagsGcPercent } from '../../src/format/index.js';
import { CACHE_SIZE, FAST, KiB, MiB, ObservedMedium, pattern, StoreBacking, StoreMedium } from './helpers.js';
import { seededRng } from '../helpers/rng.js';

function setup(): { medium: ObservedMedium; backing: StoreBacking; writes: () => number } {
  let writes = 0;
  const medium = new ObservedMedium(new StoreMedium(CACHE_SIZE), (ev) => {
    if (ev.op === 'write') writes++;
  });
  return { medium, backing: new StoreBacking(64 * MiB), writes: () => writes };
}

async function rejectsWith(p: Promise<unknown>, message: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof CacheError, `a CacheError, not ${String(err)}`);
    assert.equal(err.message, message);
    return true;
  });
}

for (const crc of [false, true]) {
  test(`a cache formatted with data_crc ${crc} refuses data_crc ${!crc} and cache_mode writethrough, and writes nothing`, async () => {
    const { medium, backing, writes } = setup();
    const data = pattern(seededRng(1), 64 * KiB);
    const cache = await Cache.open(medium, backing, { dataCrc: crc, ...FAST });
    await cache.write(MiB, data);
    await cache.close();

    const before = writes();
    await rejectsWith(Cache.open(medium, backing, { dataCrc: !crc, ...FAST }), `invalid option for data_crc: ${!crc}, expected: ${crc}`);
    await rejectsWith(Cache.open(medium, backing, { cacheMode: 'writethrough', ...FAST }), 'invalid option for cache_mode: writethrough, expected: writeback');
    await rejectsWith(Cache.open(medium, backing, { dataCrc: crc, cacheMode: 'writethrough', ...FAST }), 'invalid option for cache_mode: writethrough, expected: writeback');
    assert.equal(writes(), before, 'a refused open writes nothing to the cache device');

    // The same options, or none, open it, with its data.
    for (const opts of [{ dataCrc: crc, cacheMode: 'writeback' as const }, {}]) {
      const again = await Cache.open(medium, backing, { ...opts, ...FAST });
      assert.equal(again.status().dataCrc, crc);
      assert.equal(again.status().cacheMode, 'writeback');
      assert.ok((await again.read(MiB, data.length)).equals(data));
      await again.close();
    }
  });
}

test('gc_percent is persisted, changes while running, and only takes 0..90', async () => {
  const { medium, backing } = setup();
  const cache = await Cache.open(medium, backing, { gcPercent: 20, ...FAST });
  assert.equal(cache.status().gcPercent, 20);
  await cache.setGcPercent(33);
  assert.equal(cache.status().gcPercent, 33);
  assert.equal(flagsGcPercent(cache.status().cacheFlags), 33);
  for (const bad of [91, -1, 1.5, Number.NaN]) {
    await assert.rejects(cache.setGcPercent(bad), (err: unknown) => err instanceof CacheError && err.code === 'EINVAL', `gc_percent ${bad}`);
  }
  assert.equal(cache.status().gcPercent, 33);
  await cache.close();
  // A gcPercent option only applies when formatting; the persisted value wins.
  const again = await Cache.open(medium, backing, { gcPercent: 50, ...FAST });
  assert.equal(again.status().gcPercent, 33);
  await again.setGcPercent(0);
  await again.close();
  const third = await Cache.open(medium, backing, FAST);
  assert.equal(third.status().gcPercent, 0);
  await third.close();
});
