import { readFileSync } from 'node:fs';
import type { CliIo, Command } from './command.js';
import { COMMANDS } from './commands.js';
import { CliError, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, isSystemError, messageOf, UsageError } from './errors.js';

async function loadCommand(name: string): Promise<Command | undefined> {
  const load = Object.hasOwn(COMMANDS, name) ? COMMANDS[name] : undefined;
  return load ? (await load()).command : undefined;
}

/** The package's version; the same relative path from src/cli and from the compiled dist/cli. */
export function packageVersion(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

async function usage(): Promise<string> {
  const names = Object.keys(COMMANDS);
  const width = Math.max(...names.map((n) => n.length));
  const lines = ['usage: pcache <command> [options]', '       pcache --version', '', 'commands:'];
  for (const name of names) lines.push(`  ${name.padEnd(width)}  ${(await loadCommand(name))!.summary}`);
  lines.push('', "Run 'pcache <command> --help' for a command's options.");
  return lines.join('\n') + '\n';
}

/**
 * Run `pcache <argv...>` and resolve to the exit status. Every failure is reported here as one
 * `pcache: ...` line on stderr: user errors as they are, anything unexpected as an internal error.
 */
export async function runCli(argv: readonly string[], io: CliIo): Promise<number> {
  const [name, ...rest] = argv;
  try {
    if (name === undefined) {
      io.err(await usage());
      return EXIT_USAGE;
    }
    if (name === '--version' || name === '-V') {
      io.out(`pcache ${packageVersion()}\n`);
      return EXIT_OK;
    }
    if (name === '-h' || name === '--help' || name === 'help') {
      const topic = name === 'help' ? rest[0] : undefined;
      const cmd = topic === undefined ? undefined : await loadCommand(topic);
      if (topic !== undefined && !cmd) throw new UsageError(`unknown command '${topic}'`);
      io.out(cmd ? cmd.help : await usage());
      return EXIT_OK;
    }
    const cmd = await loadCommand(name);
    if (!cmd) throw new UsageError(`unknown command '${name}'`);
    return await cmd.run(rest, io);
  } catch (err) {
    if (err instanceof UsageError) {
      const hint = name !== undefined && Object.hasOwn(COMMANDS, name) ? `pcache ${name} --help` : 'pcache --help';
      io.err(`pcache: ${err.message}\nTry '${hint}'.\n`);
      return err.exitCode;
    }
    if (err instanceof CliError) {
      io.err(`pcache: ${err.message}\n`);
      return err.exitCode;
    }
    if (isSystemError(err)) {
      io.err(`pcache: ${err.message}\n`);
      return 1;
    }
    io.err(`pcache: internal error: ${messageOf(err)}\n`);
    return EXIT_INTERNAL;
  }
}
