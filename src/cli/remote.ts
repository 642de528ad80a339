/** Commands that talk to a running `pcache serve` through its control socket. */
import type { CliIo, Command } from './command.js';
import { promises as fsp } from 'node:fs';
import { controlRequest, controlSocketPath, type ControlResult } from './control.js';
import { CliError, UsageError } from './errors.js';

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

const statsHelp = 'usage: pcache stats <cache-dev> [--json]\n\nPrint the running server\'s counters.\n';
const statsCommand: Command = {
  summary: "print the running server's counters",
  help: statsHelp,
  async run(argv, io) {
    const { dev, flags } = deviceArg(argv, ['--json']);
    const res = await controlRequest(dev, { cmd: 'stats', args: [] });
    if (!res.ok) throw new CliError(res.error ?? 'stats failed');
    if (flags.has('--json')) {
      io.out(JSON.stringify(res.data, null, 2) + '\n');
      return 0;
    }
    const d = res.data as Record<string, unknown> & { counters: Record<string, number>; nbd: Record<string, unknown> };
    const lines: string[] = [];
    for (const [k, v] of Object.entries(d)) {
      if (k === 'counters' || k === 'nbd' || k === 'backing') continue;
      lines.push(`${k}: ${typeof v === 'object' && v !== null ? Object.values(v).join(':') : String(v)}`);
    }
    for (const [k, v] of Object.entries(d.counters)) lines.push(`${k}: ${v}`);
    for (const [k, v] of Object.entries(d.nbd)) lines.push(`nbd.${k}: ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`);
    for (const [k, v] of Object.entries((d.backing ?? {}) as Record<string, unknown>)) lines.push(`backing.${k}: ${typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v)}`);
    io.out(lines.join('\n') + '\n');
    return 0;
  },
};

const flushHelp = 'usage: pcache flush <cache-dev>\n\nWrite back everything dirty; return when dirty_tail has reached key_head.\n';
const flushCommand: Command = {
  summary: 'write back everything dirty on the running server',
  help: flushHelp,
  async run(argv, io) {
    const { dev } = deviceArg(argv);
    const tty = process.stderr.isTTY;
    const res = await controlRequest(dev, { cmd: 'flush', args: [] }, (p) => {
      if (!tty) return;
      const d = p as { dirtyBytes: number; writtenBack: number };
      process.stderr.write(`\rwriting back: ${(d.dirtyBytes / 2 ** 20).toFixed(1)} MiB dirty, ${(d.writtenBack / 2 ** 20).toFixed(1)} MiB written back   `);
    });
    if (tty) process.stderr.write('\n');
    return finish(res, io);
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
