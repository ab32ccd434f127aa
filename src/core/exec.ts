import { execFile, spawn, type SpawnOptions, type ChildProcess } from 'node:child_process';
import { SnapshiftError, type ErrorCode } from './errors.ts';

export interface ExecResult {
  stdout: string;
  stderr: string;
}

/**
 * Runs a program to completion and returns its output. A non-zero exit becomes a SnapshiftError whose
 * message names the command and carries the program's own last stderr line, which is what a user needs.
 */
export async function exec(
  program: string,
  args: readonly string[],
  options: { timeoutMs?: number; input?: string | Buffer; code?: ErrorCode; cwd?: string; /** Ends the program (SIGTERM) when aborted. */ signal?: AbortSignal } = {},
): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      program,
      args,
      { timeout: options.timeoutMs ?? 120_000, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8', cwd: options.cwd, signal: options.signal, env: childEnv() },
      (error, stdout, stderr) => {
        if (!error) return resolve({ stdout, stderr });
        if (options.signal?.aborted) return reject(options.signal.reason as Error);
        // A program that printed nothing: say how it ended. Node's own message ("Command failed: … \n") ends in
        // a newline that would break the one-line errors and failover reasons built from this one.
        const detail = lastLine(stderr) || lastLine(stdout) || howItEnded(error, options.timeoutMs ?? 120_000);
        const missing = (error as NodeJS.ErrnoException).code === 'ENOENT';
        reject(
          new SnapshiftError(
            missing ? 'PROGRAM_MISSING' : (options.code ?? 'COMMAND_FAILED'),
            missing
              ? `${program} is not installed (run "npm run demo" or "bash scripts/setup.sh" to install what is missing)`
              : `${[program, ...args].join(' ')} failed: ${detail}`,
            { cause: error },
          ),
        );
      },
    );
    if (options.input !== undefined) child.stdin?.end(options.input);
  });
}

/** True when `program` exits 0; for probes such as "is this a mount point". */
export async function succeeds(program: string, args: readonly string[]): Promise<boolean> {
  try {
    await exec(program, args, { timeoutMs: 30_000 });
    return true;
  } catch {
    return false;
  }
}

/** Starts a long-running program; the caller owns the returned child and must end it by PID. */
export function start(program: string, args: readonly string[], options: SpawnOptions = {}): ChildProcess {
  return spawn(program, args, { stdio: ['ignore', 'pipe', 'pipe'], ...options, env: childEnv(options.env) });
}

/**
 * Variables that carry our secrets (repository passwords, systemd's credential folder): a program we run
 * needs none of them, and a child's environment is readable by anyone who may read its /proc entry.
 */
export const secretEnvNames: readonly string[] = ['SNAPSHIFT_PASSWORD', 'SNAPSHIFT_NEW_PASSWORD', 'CREDENTIALS_DIRECTORY'];

/** The environment for a child process: `base` (default ours) without the secrets of `secretEnvNames`. */
export function childEnv(base: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const env = { ...base };
  for (const name of secretEnvNames) delete env[name];
  return env;
}

function howItEnded(error: Error & { code?: unknown; signal?: unknown; killed?: boolean }, timeoutMs: number): string {
  if (typeof error.code === 'string') return lastLine(error.message); // ours, not the program's: e.g. output over maxBuffer
  if (error.killed && error.signal) return `no output; ended by ${String(error.signal)} after the ${timeoutMs} ms timeout`;
  if (typeof error.code === 'number') return `exit status ${error.code}, no output`;
  if (error.signal) return `killed by ${String(error.signal)}, no output`;
  return lastLine(error.message);
}

function lastLine(text: string): string {
  const lines = text.trim().split('\n').filter((line) => line.trim() !== '');
  return lines.at(-1)?.trim() ?? '';
}
