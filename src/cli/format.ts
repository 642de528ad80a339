import { formatCache } from '../cache/format.js';
import { isBlank } from '../cache/meta.js';
import { CACHE_MODES, FormatError, GC_PERCENT_DEFAULT, GC_PERCENT_MAX, MiB, MIN_CACHE_DEV_SIZE, SEG_SIZE, type CacheMode } from '../format/index.js';
import { parseArgs, parseIntOption } from './args.js';
import type { Command } from './command.js';
import { SPARSE_RISK } from '../media/space.js';
import { withCacheDevice } from './device.js';
import { CliError, EXIT_OK, UsageError } from './errors.js';

const SUPPORTED_MODES: readonly CacheMode[] = ['writeback'];

const help = `usage: pcache format <cache-dev> [--data-crc] [--cache-mode writeback] [--gc-percent N] [--force] [--sparse]

Lay out a fresh, empty cache on <cache-dev> (a file or a block device of at least 512 MiB),
exactly as dm-pcache does on first use. The path must exist: for a file, create it first,
e.g. truncate -s 4G cache.img. A file is given all its blocks first (fallocate), so that the
cache never meets a full filesystem; if the filesystem cannot hold it, nothing is written and
the message says how much space is free.

  --data-crc          store a CRC of every cached extent and verify it at start-up
  --cache-mode MODE   only writeback is supported (the default)
  --gc-percent N      start garbage collection when N% of the segments are in use
                      (0..${GC_PERCENT_MAX}, default ${GC_PERCENT_DEFAULT})
  --force             format even if the device already holds a cache (its content is lost)
  --sparse            leave a file sparse (as truncate made it); the risk: ${SPARSE_RISK}
`;

const spec = {
  'data-crc': { type: 'boolean' },
  'cache-mode': { type: 'string', value: 'MODE' },
  'gc-percent': { type: 'string', value: 'N' },
  force: { type: 'boolean' },
  sparse: { type: 'boolean' },
} as const;

async function run(argv: string[], io: Parameters<Command['run']>[1]): Promise<number> {
  const args = parseArgs(argv, spec, { min: 1, max: 1, names: 'the cache device' });
  if (args.help) {
    io.out(help);
    return EXIT_OK;
  }
  const modeText = args.options['cache-mode'] ?? 'writeback';
  if (!(CACHE_MODES as readonly string[]).includes(modeText)) {
    throw new UsageError(`unknown cache mode '${modeText}' (dm-pcache knows ${CACHE_MODES.join(', ')})`);
  }
  const mode = modeText as CacheMode;
  if (!SUPPORTED_MODES.includes(mode)) throw new CliError(`cache mode ${mode} is not supported yet; only writeback is`);
  const gcText = args.options['gc-percent'];
  const gcPercent = gcText === undefined ? GC_PERCENT_DEFAULT : parseIntOption('gc-percent', gcText, 0, GC_PERCENT_MAX);
  const dataCrc = args.options['data-crc'] === true;
  const path = args.positionals[0]!;

  return withCacheDevice(path, { readOnly: false }, async (medium) => {
    // Size first: formatCache refuses a small device with dm-pcache's message, whatever it holds.
    if (medium.size() >= MIN_CACHE_DEV_SIZE && !args.options.force && !(await isBlank(medium))) {
      throw new CliError(`${path} already holds a formatted cache (its superblock magic is set); use --force to format it anyway`);
    }
    if (medium.size() >= MIN_CACHE_DEV_SIZE && args.options.sparse !== true) await medium.allocate();
    const result = await formatCache(medium, { dataCrc, mode, gcPercent });
    if (result instanceof FormatError) throw new CliError(result.message);
    io.out(
      `formatted ${path}: ${result.segNum} segments of ${SEG_SIZE / MiB} MiB, cache mode ${mode}, ` +
        `data_crc ${dataCrc ? 'on' : 'off'}, gc_percent ${gcPercent}\n`,
    );
    return EXIT_OK;
  });
}

export const command: Command = { summary: 'lay out a fresh cache on a cache device', help, run };
