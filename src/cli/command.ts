/** Where a command writes; a test can capture it instead of the process streams. */
export interface CliIo {
  out(text: string): void;
  err(text: string): void;
}

export interface Command {
  /** One line for the command list. */
  summary: string;
  /** The full help text, starting with the usage line. */
  help: string;
  /** Runs with the arguments after the command name; resolves to the exit status. */
  run(argv: string[], io: CliIo): Promise<number>;
}

export const processIo: CliIo = {
  out: (text) => void process.stdout.write(text),
  err: (text) => void process.stderr.write(text),
};
