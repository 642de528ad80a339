/**
 * `pcache serve` runs with a 16-thread libuv pool unless the user sized it: read misses and fills
 * are thread-pool file I/O, and libuv's default 4 threads cap them. The pool size can only be
 * chosen before the pool starts, so this checks the started process itself, not only the figure
 * it reports: libuv creates every pool thread when the pool starts, so a server with a 16-thread
 * pool has exactly 12 threads more than the same server told to use 4.
 */
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { runPcache } from '../helpers/cli.js';
import { sparseFile, startServe, type ServeProc } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;

async function serveWithPool(dir: string, name: string, poolEnv: string | undefined): Promise<{ server: ServeProc; cache: string; threads: number; reported: number }> {
  const cache = await sparseFile(join(dir, `${name}-cache.img`), 512 * MiB);
  const backing = await sparseFile(join(dir, `${name}-backing.img`), 64 * MiB);
  const env = { ...process.env };
  if (poolEnv === undefined) delete env.UV_THREADPOOL_SIZE;
  else env.UV_THREADPOOL_SIZE = poolEnv;
  const server = await startServe(dir, cache, backing, [], [], env);
  const stats = await runPcache(['stats', cache, '--json']);
  assert.equal(stats.code, 0, stats.stderr);
  const reported = (JSON.parse(stats.stdout) as { threadpoolSize: number }).threadpoolSize;
  // The pool has started by now: serving the status line read and wrote the cache file through it.
  const threads = readdirSync(`/proc/${server.proc.pid}/task`).length;
  return { server, cache, threads, reported };
}

test('a started server runs a 16-thread libuv pool by default and keeps a size the user set', { skip: process.platform !== 'linux' && 'needs /proc (Linux)' }, async () => {
  const dir = await tempDir('pcache-threadpool-');
  const byDefault = await serveWithPool(dir, 'default', undefined);
  const userSet = await serveWithPool(dir, 'user', '4');
  try {
    assert.equal(byDefault.reported, 16);
    assert.equal(userSet.reported, 4);
    assert.equal(byDefault.threads - userSet.threads, 12, `threads: ${byDefault.threads} with the default, ${userSet.threads} with UV_THREADPOOL_SIZE=4`);
  } finally {
    assert.equal(await byDefault.server.stop(), 0);
    assert.equal(await userSet.server.stop(), 0);
  }
});
