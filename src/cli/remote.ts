/** Commands that talk to a running `pcache serve` through its control socket. */
import { describeFailure, type FailureNote } from '../cache/failures.js';
import { promises as fsp } from 'node:fs';
import { parseArgs, parseIntOption } from './args.js';
import { processIo, type CliIo, type Command } from './command.js';
import { controlRequest, controlSocketPath, type ControlResult } from './control.js';
import { CliError, UsageError } from './errors.js';
import { mib, Progress } from './progress.js';
import { CLEAR_SCREEN, numberOr0 as n, renderStatsFrame, type StatsSnapshot } from './stats-watch.js';

/** The control socket disappears last when a server stops, after its device lock is released. */
async function waitGone(dev: string): Promise<void> {
  const path = await controlSocketPath(dev);
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    try {
      await fsp.stat(path);
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new CliError(`the pcache server for ${dev} did not stop within 60 s`);
}

function finish(res: ControlResult, io: CliIo): number {
  if (!res.ok) throw new CliError(res.error ?? 'the server refused the request');
  if (res.output) io.out(res.output + '\n');
  return 0;
}

function deviceArg(argv: string[], allowed: string[] = []): { dev: string; flags: Set<string> } {
  const flags = new Set<string>();
  const pos: string[] = [];
  for (const a of argv) {
    if (a.startsWith('--')) {
      if (!allowed.includes(a)) throw new UsageError(`unknown option ${a}`);
      flags.add(a);
    } else pos.push(a);
  }
  if (pos.length !== 1) throw new UsageError(pos.length ? `unexpected argument ${pos[1]}` : 'missing <cache-dev>');
  return { dev: pos[0]!, flags };
}

/** `--help` prints the command's help on stdout, whatever else is on the line. */
function withHelp(cmd: Command): Command {
  return {
    ...cmd,
    async run(argv, io) {
      if (argv[0] === '--help' || argv[0] === '-h' || (cmd !== messageCommand && (argv.includes('--help') || argv.includes('-h')))) {
        io.out(cmd.help);
        return 0;
      }
      return cmd.run(argv, io);
    },
  };
}

function simple(name: string, summary: string): Command {
  const help = `usage: pcache ${name} <cache-dev>\n\n${summary}.\n`;
  return {
    summary,
    help,
    async run(argv, io) {
      const { dev } = deviceArg(argv);
      return finish(await controlRequest(dev, { cmd: name, args: [] }), io);
    },
  };
}

export const status = withHelp(simple('status', "print the running server's status as dmsetup status does for dm-pcache"));
export const table = withHelp(simple('table', "print the running server's table line as dmsetup table does for dm-pcache"));

const messageHelp =
  'usage: pcache message <cache-dev> gc_percent <0..90>\n       pcache message <cache-dev> sequential_cutoff <BYTES>\n\n' +
  'Send a dm-pcache message to the running server. sequential_cutoff is a pcache extension (as bcache\'s):\n' +
  'read streams longer than BYTES (e.g. 4M) are not filled into the cache; 0 turns the cutoff off.\n';
const messageCommand: Command = {
  summary: 'send a message (gc_percent N, sequential_cutoff BYTES) to the running server',
  help: messageHelp,
  async run(argv, io) {
    if (argv.length < 1) throw new UsageError('missing <cache-dev>');
    return finish(await controlRequest(argv[0]!, { cmd: 'message', args: argv.slice(1) }), io);
  },
};

const statsHelp = `usage: pcache stats <cache-dev> [--json]
       pcache stats <cache-dev> --watch [SECONDS] [--count N]

Print the running server's counters.

  --json           all counters as JSON
  --watch [S]      redraw a table of rates and gauges every S seconds (default 1) until
                   interrupted: IOPS and MiB/s by operation, hit ratio, dirty bytes,
                   write-back rate, segments
  --count N        with --watch: stop after N frames
`;
const statsSpec = { json: { type: 'boolean' }, watch: { type: 'boolean' }, count: { type: 'string', value: 'N' } } as const;

async function fetchStats(dev: string): Promise<StatsSnapshot & Record<string, unknown>> {
  const res = await controlRequest(dev, { cmd: 'stats', args: [] });
  if (!res.ok) throw new CliError(res.error ?? 'stats failed');
  return res.data as StatsSnapshot & Record<string, unknown>;
}

function printStats(d: Record<string, unknown> & { counters: Record<string, number>; nbd: Record<string, unknown> }, io: CliIo): void {
  const lines: string[] = [];
  for (const [k, v] of Object.entries(d)) {
    if (k === 'counters' || k === 'nbd' || k === 'backing') continue;
    if (k.endsWith('LastError')) {
      lines.push(`${k}: ${v === null ? 'none' : describeFailure(v as FailureNote)}`);
      continue;
    }
    lines.push(`${k}: ${typeof v === 'object' && v !== null ? Object.values(v).join(':') : String(v)}`);
  }
  for (const [k, v] of Object.entries(d.counters)) lines.push(`${k}: ${v}`);
  for (const [k, v] of Object.entries(d.nbd)) lines.push(`nbd.${k}: ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`);
  for (const [k, v] of Object.entries((d.backing ?? {}) as Record<string, unknown>)) lines.push(`backing.${k}: ${typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v)}`);
  io.out(lines.join('\n') + '\n');
}

/** Frames until SIGINT/SIGTERM or `count`; a frame on a terminal replaces the previous one. */
async function watchStats(dev: string, seconds: number, count: number, io: CliIo): Promise<number> {
  const tty = io === processIo && process.stdout.isTTY === true;
  let stop = false;
  let wake: (() => void) | null = null;
  const onSignal = (): void => {
    stop = true;
    wake?.();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    let prev: StatsSnapshot | null = null;
    let prevAt = 0;
    for (let frame = 0; !stop && frame < count; frame++) {
      if (frame > 0) {
        await new Promise<void>((resolve) => {
          const t = setTimeout(resolve, seconds * 1000);
          wake = () => {
            clearTimeout(t);
            resolve();
          };
        });
        wake = null;
        if (stop) break;
      }
      let cur: StatsSnapshot;
      try {
        cur = await fetchStats(dev);
      } catch (err) {
        if (frame > 0 && err instanceof CliError) throw new CliError(`${err.message} (the server stopped while watching)`);
        throw err;
      }
      const at = performance.now();
      const title = `pcache stats ${dev}  every ${seconds} s  ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')}`;
      const text = renderStatsFrame(title, cur, prev, (at - prevAt) / 1000);
      io.out(tty ? CLEAR_SCREEN + text : (frame > 0 ? '\n' : '') + text);
      prev = cur;
      prevAt = at;
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  return 0;
}

const statsCommand: Command = {
  summary: "print the running server's counters, or watch their rates",
  help: statsHelp,
  async run(argv, io) {
    // --watch takes an optional value: --watch=S is --watch S.
    const args = parseArgs(
      argv.flatMap((a) => (a.startsWith('--watch=') ? ['--watch', a.slice(8)] : [a])),
      statsSpec,
      { min: 1, max: 2, names: '<cache-dev>' },
    );
    const [dev, secondsText] = args.positionals as [string, string | undefined];
    if (secondsText !== undefined && !args.options.watch) throw new UsageError(`unexpected argument ${secondsText}`);
    if (args.options.count !== undefined && !args.options.watch) throw new UsageError('--count goes with --watch');
    if (args.options.watch) {
      if (args.options.json) throw new UsageError('--json and --watch exclude each other');
      const seconds = secondsText === undefined ? 1 : Number(secondsText);
      if (!/^\d+(\.\d+)?$/.test(secondsText ?? '1') || !(seconds >= 0.1 && seconds <= 3600)) {
        throw new UsageError(`--watch takes an interval in seconds from 0.1 to 3600, not '${secondsText}'`);
      }
      const count = args.options.count === undefined ? Infinity : parseIntOption('count', args.options.count, 1, 1e9);
      return watchStats(dev, seconds, count, io);
    }
    const d = await fetchStats(dev);
    if (args.options.json) io.out(JSON.stringify(d, null, 2) + '\n');
    else printStats(d as Parameters<typeof printStats>[0], io);
    return 0;
  },
};

const flushHelp = `usage: pcache flush <cache-dev> [--timeout S] [--quiet]

Write back everything dirty; return when dirty_tail has reached key_head. Progress goes to
stderr (a bar on a terminal, a line every few seconds otherwise), with the last write-back
error while write-back is failing.

  --timeout S   give up after S seconds, exit 1 and say how much is still dirty (the
                server goes on writing back)
  --quiet       no progress output
`;
const flushSpec = { timeout: { type: 'string', value: 'S' }, quiet: { type: 'boolean' } } as const;
/** How often a waiting flush reads the server's counters for its progress and errors. */
const FLUSH_POLL_MS = 500;

const flushCommand: Command = {
  summary: 'write back everything dirty on the running server',
  help: flushHelp,
  async run(argv, io) {
    const args = parseArgs(argv, flushSpec, { min: 1, max: 1, names: '<cache-dev>' });
    const dev = args.positionals[0]!;
    const timeout = args.options.timeout === undefined ? null : parseIntOption('timeout', args.options.timeout, 1, 10 * 365 * 86400);
    const first = await fetchStats(dev);
    const startWritten = n(first.counters?.writtenBackBytes);
    let total = n(first.dirtyBytes);
    const progress = new Progress(io, { label: 'flush', total, quiet: args.options.quiet === true });
    let latest: StatsSnapshot = first;
    const show = (force = false): void => {
      const done = Math.max(0, n(latest.counters?.writtenBackBytes) - startWritten);
      // Writes arriving during the flush are part of it: the total grows.
      total = Math.max(total, done + n(latest.dirtyBytes));
      progress.setTotal(total);
      const error = latest.writebackLastError ?? latest.writebackError;
      progress.update(done, { note: error ? `write-back failing: ${error}` : null, force });
    };
    let finished = false;
    const poll = setInterval(() => {
      fetchStats(dev).then(
        (s) => {
          if (finished) return;
          latest = s;
          show();
        },
        () => undefined,
      );
    }, FLUSH_POLL_MS);
    const abort = new AbortController();
    const timer = timeout === null ? null : setTimeout(() => abort.abort(new Error('timeout')), timeout * 1000);
    try {
      const res = await controlRequest(dev, { cmd: 'flush', args: [] }, undefined, abort.signal);
      latest = await fetchStats(dev).catch(() => latest);
      finished = true;
      if (total > 0) show(true);
      progress.end();
      return finish(res, io);
    } catch (err) {
      finished = true;
      progress.end();
      if (!abort.signal.aborted) throw err;
      const error = latest.writebackLastError ?? latest.writebackError;
      throw new CliError(
        `flush did not finish within ${timeout} s: ${mib(n(latest.dirtyBytes))} still dirty` +
          `${error ? `; last write-back error: ${error}` : ''}; the server goes on writing back`,
      );
    } finally {
      clearInterval(poll);
      if (timer) clearTimeout(timer);
    }
  },
};

const stopHelp = 'usage: pcache stop <cache-dev> [--force]\n\nStop the running server: finish requests in flight, write the open log, sync, exit.\n--force ends at once; everything flushed stays safe.\n';
const stopCommand: Command = {
  summary: 'stop the running server',
  help: stopHelp,
  async run(argv, io) {
    const { dev, flags } = deviceArg(argv, ['--force']);
    const code = finish(await controlRequest(dev, { cmd: 'stop', args: flags.has('--force') ? ['--force'] : [] }), io);
    await waitGone(dev);
    return code;
  },
};
export const message = withHelp(messageCommand);
export const stats = withHelp(statsCommand);
export const flush = withHelp(flushCommand);
export const stop = withHelp(stopCommand);
