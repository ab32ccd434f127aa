import { readFile } from 'node:fs/promises';
import { SnapshiftError } from '../core/errors.ts';

/**
 * A password from --password-file, then SNAPSHIFT_PASSWORD, then a prompt on a terminal (DESIGN.md §
 * Conventions: never from a command-line argument). `envName` lets "key add" read a second password.
 */
export async function resolvePassword(opts: { passwordFile?: string; envName?: string; prompt?: string; confirm?: boolean } = {}): Promise<string> {
  const envName = opts.envName ?? 'SNAPSHIFT_PASSWORD';
  if (opts.passwordFile !== undefined) {
    const text = await readFile(opts.passwordFile, 'utf8').catch((error: NodeJS.ErrnoException) => {
      throw new SnapshiftError('BAD_ARGUMENT', `cannot read password file ${opts.passwordFile}: ${error.code ?? error.message}`);
    });
    const password = text.replace(/\r?\n$/, '');
    if (password === '') throw new SnapshiftError('BAD_ARGUMENT', `password file ${opts.passwordFile} is empty`);
    return password;
  }
  const fromEnv = process.env[envName];
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  if (!process.stdin.isTTY || !process.stderr.isTTY) {
    throw new SnapshiftError('REPO_PASSWORD_REQUIRED', `a password is needed: give --password-file or set ${envName} (no terminal to prompt on)`);
  }
  const password = await promptHidden(opts.prompt ?? 'repository password: ');
  if (opts.confirm && (await promptHidden('enter it again: ')) !== password) throw new SnapshiftError('BAD_ARGUMENT', 'the passwords do not match');
  if (password === '') throw new SnapshiftError('BAD_ARGUMENT', 'an empty password is not allowed');
  return password;
}

/** Reads one line from the terminal without echoing it. */
function promptHidden(prompt: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const stdin = process.stdin;
    process.stderr.write(prompt);
    stdin.setRawMode(true);
    stdin.resume();
    let typed = '';
    const onData = (data: Buffer): void => {
      for (const char of data.toString('utf8')) {
        if (char === '\r' || char === '\n') return finish(() => resolve(typed));
        if (char === '\u0003') return finish(() => reject(new SnapshiftError('USAGE', 'interrupted')));
        if (char === '\u007f') typed = typed.slice(0, -1);
        else typed += char;
      }
    };
    const finish = (then: () => void): void => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
      then();
    };
    stdin.on('data', onData);
  });
}
