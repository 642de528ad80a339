import { promises as fsp } from 'node:fs';
import type { BackingDevice } from '../backing/backing.js';
import { foreignScheme, isNbdUri, openBacking } from '../backing/open.js';
import { Cache } from '../cache/cache.js';
import { CacheError } from '../cache/errors.js';
import { isBlank, loadMeta } from '../cache/meta.js';
import type { CacheStatus } from '../cache/status.js';
import { flagsInitDone, formatPosition, FormatError, MiB, samePosition } from '../format/index.js';
import { parseArgs, parseIntOption } from './args.js';
import type { CliIo, Command } from './command.js';
import { openCacheDevice } from './device.js';
import { CliError, EXIT_OK, messageOf } from './errors.js';
import { mib, Progress } from './progress.js';

const RETRIES_DEFAULT = 5;

const help = `usage: pcache writeback <cache-dev> <backing-dev> [--retries N] [--quiet]

Write back everything dirty on a cache device whose server is gone (as cache_writeback does for
dm-cache): replay the log, copy every dirty key to <backing-dev> kset by kset in log order with a
flush after each, and leave the cache clean and consistent (dirty_tail = key_head). The cached
data stays valid: the pair can be served again afterwards.

<backing-dev> must be the device the cache was in front of: a file, a block device or an NBD URI.
A progress bar goes to stderr when it is a terminal, progress lines otherwise; a summary goes to
stdout. Exits 0 once the cache is clean.

  --retries N   give up after N failed write-back attempts (default ${RETRIES_DEFAULT}); each is
                retried with a growing delay
  --quiet       no progress output
`;

const spec = {
  retries: { type: 'string', value: 'N' },
  quiet: { type: 'boolean' },
} as const;

async function openBackingDevice(spec: string): Promise<BackingDevice> {
  if (!isNbdUri(spec) && foreignScheme(spec) === null) {
    try {
      await fsp.stat(spec);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new CliError(`backing device ${spec} does not exist`);
      throw err;
    }
  }
  return openBacking(spec);
}

async function run(argv: string[], io: CliIo): Promise<number> {
  const args = parseArgs(argv, spec, { min: 2, max: 2, names: 'the cache device and the backing device' });
  if (args.help) {
    io.out(help);
    return EXIT_OK;
  }
  const retriesText = args.options.retries;
  const retries = retriesText === undefined ? RETRIES_DEFAULT : parseIntOption('retries', retriesText, 0, 1000);
  const [cachePath, backingPath] = args.positionals as [string, string];

  const medium = await openCacheDevice(cachePath, { readOnly: false });
  try {
    if (await isBlank(medium)) throw new CliError(`${cachePath} holds no cache (its superblock magic is 0); there is nothing to write back`);
    const meta = await loadMeta(medium);
    if (meta instanceof FormatError) throw new CliError(`${cachePath}: ${meta.message}`);
    if (!flagsInitDone(meta.cacheInfo.flags)) {
      io.out(`${cachePath}: the cache was never started; there is nothing to write back\n`);
      return EXIT_OK;
    }

    const backing = await openBackingDevice(backingPath);
    try {
      const started = Date.now();
      let cache: Cache;
      try {
        // Never format here: a blank device was refused above, and dm-pcache's "first start"
        // formatting has no place in an offline tool.
        cache = await Cache.open(medium, backing, { formatIfBlank: false });
      } catch (err) {
        if (err instanceof CacheError) throw new CliError(`${cachePath}: ${err.message}`);
        throw err;
      }
      if (cache.replayNote) io.err(`pcache: warning: ${cachePath}: ${cache.replayNote}\n`);
      const first = cache.status();
      const from = first.dirtyTail;
      const to = first.keyHead;
      const totalDirty = first.counters.dirtyBytes;
      const progress = new Progress(io, { label: 'writeback', total: totalDirty, quiet: args.options.quiet === true });
      const show = (s: CacheStatus, force = false): void =>
        progress.update(Math.max(0, totalDirty - s.counters.dirtyBytes), {
          rateBytes: s.counters.writtenBackBytes,
          detail: `${s.counters.writtenBackKsets} ksets`,
          note: s.writebackError ? `retrying: ${s.writebackError}` : null,
          force,
        });
      try {
        await cache.drain({ maxErrors: retries, onProgress: (s) => show(s) });
      } catch (err) {
        progress.end();
        await cache.close().catch(() => undefined);
        throw new CliError(`${cachePath}: ${messageOf(err)}; the cache still holds the rest (dirty_tail ${formatPosition(cache.dirtyTail)})`);
      }
      const last = cache.status();
      if (last.counters.writtenBackKsets > 0) show(last, true);
      progress.end();
      await cache.close();
      if (!samePosition(last.dirtyTail, last.keyHead)) throw new CliError(`${cachePath}: write-back stopped at ${formatPosition(last.dirtyTail)} before key_head ${formatPosition(last.keyHead)}`);

      const secs = ((Date.now() - started) / 1000).toFixed(1);
      const c = last.counters;
      if (c.writtenBackKsets === 0 && samePosition(from, to)) {
        io.out(`${cachePath}: nothing to write back; the cache is clean (dirty_tail = key_head = ${formatPosition(to)})\n`);
      } else {
        io.out(
          `${cachePath}: wrote back ${c.writtenBackKsets} kset${c.writtenBackKsets === 1 ? '' : 's'}, ` +
            `${c.writtenBackBytes} bytes (${mib(c.writtenBackBytes)}) to ${backingPath} in ${secs} s; ` +
            `dirty_tail ${formatPosition(from)} -> ${formatPosition(last.dirtyTail)}, the cache is clean\n`,
        );
      }
      return EXIT_OK;
    } finally {
      await backing.close();
    }
  } finally {
    await medium.close();
  }
}

export const command: Command = { summary: 'write back everything dirty on a cache device (offline drain)', help, run };
