/**
 * Issue 13, finding 3 at its root: `pcache format` gives a cache file all its blocks, so a full
 * filesystem can never meet the cache later; when the filesystem cannot hold the file, the error
 * says how much is free and nothing is written. `--sparse` keeps the old behaviour.
 */
import assert from 'node:assert/strict';
import { openSync, readSync, closeSync, statfsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { runPcache } from '../helpers/cli.js';
import { sparseFile } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function superblockIsZero(path: string): boolean {
  const buf = Buffer.alloc(4096);
  const fd = openSync(path, 'r');
  try {
    readSync(fd, buf, 0, buf.length, 4096);
  } finally {
    closeSync(fd);
  }
  return buf.every((b) => b === 0);
}

test('format allocates the whole cache file; --sparse leaves it sparse', async () => {
  const dir = await tempDir();
  const full = await sparseFile(join(dir, 'full.img'), 512 * MiB);
  const r = await runPcache(['format', full]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(statSync(full).blocks * 512 >= 512 * MiB, `allocated ${statSync(full).blocks * 512}`);
  const sparse = await sparseFile(join(dir, 'sparse.img'), 512 * MiB);
  const s = await runPcache(['format', '--sparse', sparse]);
  assert.equal(s.code, 0, s.stderr);
  assert.ok(statSync(sparse).blocks * 512 < 64 * MiB, 'left sparse');
  const help = await runPcache(['format', '--help']);
  assert.match(help.stdout, /--sparse .*the risk: a sparse cache file takes its blocks as the cache first writes them/s);
});

test('a cache file larger than the free space is refused, naming the free space, and left untouched', async () => {
  const dir = await tempDir();
  const fs = statfsSync(dir);
  const free = fs.bavail * fs.bsize;
  const size = Math.ceil((free + 2 * GiB) / (16 * MiB)) * 16 * MiB;
  const path = await sparseFile(join(dir, 'huge.img'), size);
  const r = await runPcache(['format', path]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /^pcache: cache device .*huge\.img: not enough space to allocate [\d.]+ GiB: [\d.]+ GiB more is needed and its filesystem has [\d.]+ GiB free \(free some space, use a smaller file, or --sparse: /);
  assert.equal(r.stderr.trim().split('\n').length, 1);
  assert.ok(superblockIsZero(path), 'nothing written');
  assert.ok(statSync(path).blocks * 512 < MiB, 'nothing allocated');
});
