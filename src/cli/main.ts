/**
 * The `pcache` executable. The dispatcher and the command table live in run.ts and commands.ts,
 * so that tests can run commands in-process without this module's side effects.
 */
import { processIo } from './command.js';
import { EXIT_INTERNAL, messageOf } from './errors.js';
import { runCli } from './run.js';

// A failure outside any command's promise (a stray callback) still gets one line, not a stack.
const fatal = (err: unknown): void => {
  process.stderr.write(`pcache: internal error: ${messageOf(err)}\n`);
  process.exit(EXIT_INTERNAL);
};
process.on('uncaughtException', fatal);
process.on('unhandledRejection', fatal);

process.exitCode = await runCli(process.argv.slice(2), processIo);
