import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { SnapshiftError } from '../core/errors.ts';
import { repositoryEncryption } from '../repository/index.ts';
import type { JobDefinition } from './job-definition.ts';

/** The systemd credential (LoadCredential=) holding a job's own password: `snapshift-job-<job name>`. */
export function jobCredentialName(jobName: string): string {
  return `snapshift-job-${jobName}`;
}

/** The systemd credential for jobs without a password of their own (`daemon --install-unit --password-file`). */
export const defaultCredentialName = 'snapshift-password';

/**
 * The repository password of a job that runs unattended, from the first of: the job's systemd credential
 * (`$CREDENTIALS_DIRECTORY/snapshift-job-<name>`, a copy of its password file that systemd hands the daemon),
 * the job's password file, the daemon's default credential (`snapshift-password`), SNAPSHIFT_PASSWORD,
 * `prompt` (a terminal, for `job run`). Undefined for an unencrypted repository, and for
 * a missing one (the run reports that). Throws REPO_PASSWORD_REQUIRED, naming every source, when none has it.
 */
export async function jobPassword(job: JobDefinition, options: { env?: NodeJS.ProcessEnv; prompt?: () => Promise<string> } = {}): Promise<string | undefined> {
  const env = options.env ?? process.env;
  const encryption = await repositoryEncryption(job.repository);
  if (encryption === 'none') return undefined;
  const credentials = env.CREDENTIALS_DIRECTORY;
  const credential = async (name: string) => (credentials ? readPassword(join(credentials, name), { optional: true }) : undefined);
  const own = await credential(jobCredentialName(job.name));
  if (own !== undefined) return own;
  if (job.passwordFile !== undefined) return readPassword(job.passwordFile, { optional: false });
  const shared = await credential(defaultCredentialName);
  if (shared !== undefined) return shared;
  const fromEnv = env.SNAPSHIFT_PASSWORD;
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  if (encryption === 'missing') return undefined;
  if (options.prompt) return options.prompt();
  throw new SnapshiftError(
    'REPO_PASSWORD_REQUIRED',
    `job ${job.name}: repository ${job.repository} is encrypted and no password was found ` +
      `(no credential ${jobCredentialName(job.name)} or ${defaultCredentialName}${credentials ? ` in ${credentials}` : ': CREDENTIALS_DIRECTORY is not set'}, ` +
      'no password file in the job, no SNAPSHIFT_PASSWORD): give the job --password-file, then run "snapshift daemon --install-unit" again',
  );
}

/** A password file's content without its final newline; undefined if `optional` and the file does not exist. */
async function readPassword(path: string, options: { optional: boolean }): Promise<string | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (options.optional && code === 'ENOENT') return undefined;
    throw new SnapshiftError('BAD_ARGUMENT', `cannot read password file ${path}: ${code ?? (error as Error).message}`, { cause: error });
  }
  const password = text.replace(/\r?\n$/, '');
  if (password === '') throw new SnapshiftError('BAD_ARGUMENT', `password file ${path} is empty`);
  return password;
}
