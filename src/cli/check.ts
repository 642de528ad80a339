import { checkCache, type CheckReport } from '../cache/check.js';
import { formatPosition, type Position } from '../format/index.js';
import { parseArgs, parseSizeOption } from './args.js';
import type { CliIo, Command } from './command.js';
import { withCacheDevice } from './device.js';
import { EXIT_FAILURE, EXIT_OK } from './errors.js';
import { Progress } from './progress.js';

/** A check this quick shows no progress at all. */
const PROGRESS_AFTER_MS = 1_000;

const help = `usage: pcache check <cache-dev> [--json] [--backing-size N] [--quiet]

Validate a cache device: the superblock, both slots of every two-slot record, the segment
chain, the tails and their order, every kset from key_tail to the end of the log with its keys,
and the data CRC of every key when data_crc is on. Exits 0 only when no problem is found.
Warnings (such as the harmless leftovers of a torn update) do not fail the check.

  --json              print the full report as JSON
  --backing-size N    the backing device's size (bytes, or with K/M/G/T); keys reaching
                      past it are problems
  --quiet             no progress output (shown on stderr when a check takes over a second:
                      a bar on a terminal, a line every few seconds otherwise)
`;

const spec = {
  json: { type: 'boolean' },
  'backing-size': { type: 'string', value: 'N' },
  quiet: { type: 'boolean' },
} as const;

function pos(p: Position | null): string {
  return p ? formatPosition(p) : '?';
}

export function formatCheckReport(r: CheckReport): string {
  const lines: string[] = [];
  const row = (name: string, value: string): void => void lines.push(`${name.padEnd(14)}${value}`);
  row('cache device', `${r.device} (${r.deviceSize} bytes)`);
  if (r.segNum !== null) {
    row('segments', `${r.segments} (seg_num ${r.segNum}), ${r.usedSegments} used`);
    row('data_crc', r.dataCrc === null ? '?' : r.dataCrc ? `on, ${r.dataCrcVerified} keys verified` : 'off');
  }
  if (r.keyTail) {
    row('tails', `key_tail ${pos(r.keyTail)}, dirty_tail ${pos(r.dirtyTail)}, key_head ${pos(r.keyHead)}`);
    row('log', `${r.logBytes} bytes, ${r.ksets} ksets (${r.lastKsets} LAST), ends: ${r.logEnd ?? '?'}`);
    row('keys', `${r.keys}: ${r.dirtyKeys} dirty, ${r.cleanKeys} clean, ${r.staleKeys} stale`);
    row('dirty bytes', String(r.dirtyBytes));
  }
  row('warnings', r.warnings.length === 0 ? 'none' : String(r.warnings.length));
  for (const w of r.warnings) lines.push(`  warning: ${w}`);
  row('problems', r.problems.length === 0 ? 'none' : String(r.problems.length));
  for (const p of r.problems) lines.push(`  problem: ${p}`);
  return lines.join('\n') + '\n';
}

async function run(argv: string[], io: CliIo): Promise<number> {
  const args = parseArgs(argv, spec, { min: 1, max: 1, names: 'the cache device' });
  if (args.help) {
    io.out(help);
    return EXIT_OK;
  }
  const sizeText = args.options['backing-size'];
  const backingSize = sizeText === undefined ? undefined : parseSizeOption('backing-size', sizeText);
  const path = args.positionals[0]!;
  const progress = new Progress(io, { label: 'check', total: null, quiet: args.options.quiet === true, quietForMs: PROGRESS_AFTER_MS });
  let last = { bytesRead: 0, ksets: 0 };
  const show = (force: boolean): void => progress.update(last.bytesRead, { detail: `${last.ksets} ksets`, force });
  const report = await withCacheDevice(path, { readOnly: true }, (medium) =>
    checkCache(medium, {
      backingSize,
      onProgress: (p) => {
        last = p;
        show(false);
      },
    }),
  );
  show(true);
  progress.end();
  io.out(args.options.json ? JSON.stringify(report, null, 2) + '\n' : formatCheckReport(report));
  if (report.clean) return EXIT_OK;
  const n = report.problems.length;
  io.err(`pcache: ${path}: ${n} problem${n === 1 ? '' : 's'} found${args.options.json ? '' : ' (listed above)'}\n`);
  return EXIT_FAILURE;
}

export const command: Command = { summary: 'validate a cache device and summarise its content', help, run };
