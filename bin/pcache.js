#!/usr/bin/env node
// CommonJS on purpose (bin/package.json): an ES module entry is read by Node's ESM loader through
// libuv's thread pool, which starts the pool with its default 4 threads before the module's first
// line runs. A CommonJS entry is read synchronously, so the pool does not exist yet here and
// UV_THREADPOOL_SIZE set now still takes effect. Read misses and fills are thread-pool file reads
// and writes; 4 threads cap them (16 measured +25-30% on 4 KiB qd32 misses, BENCHMARKS.md).
if (!process.env.UV_THREADPOOL_SIZE) process.env.UV_THREADPOOL_SIZE = '16';

// The installed package runs the compiled JavaScript in dist/ with plain node: no TypeScript
// loader at run time. A source checkout (src/ is never in the package) runs the TypeScript
// through tsx instead, so development needs no build step and never runs a stale dist/.
const { existsSync } = require('node:fs');
const { join } = require('node:path');
const { pathToFileURL } = require('node:url');

async function start() {
  const source = join(__dirname, '../src/cli/main.ts');
  if (existsSync(source)) {
    const { register } = await import('tsx/esm/api');
    register();
    await import(pathToFileURL(source).href);
  } else {
    await import(pathToFileURL(join(__dirname, '../dist/cli/main.js')).href);
  }
}

start().catch((err) => {
  process.stderr.write(`pcache: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exitCode = 1;
});
