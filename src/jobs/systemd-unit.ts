import { resolve } from 'node:path';
import { SnapshiftError } from '../core/errors.ts';
import type { JobDefinition } from './job-definition.ts';
import { defaultCredentialName, jobCredentialName } from './job-password.ts';

export interface DaemonUnitInput {
  /** The node binary and bin/snapshift, as ExecStart runs them. */
  nodePath: string;
  launcher: string;
  home: string;
  /** Jobs whose password files become credentials. */
  jobs: readonly JobDefinition[];
  /** A password for jobs without a password file of their own. */
  defaultPasswordFile?: string;
}

/**
 * The systemd unit of `snapshift daemon`. Repository passwords reach it as credentials (systemd.exec
 * LoadCredential=): systemd copies each job's password file into a folder only the service can read and
 * names it in $CREDENTIALS_DIRECTORY, so no password sits in the unit or the environment. A job added later
 * needs the unit written again.
 */
export function daemonUnitText(input: DaemonUnitInput): string {
  const credentials = [
    ...input.jobs.filter((job) => job.passwordFile !== undefined).map((job) => credentialLine(jobCredentialName(job.name), job.passwordFile!)),
    ...(input.defaultPasswordFile !== undefined ? [credentialLine(defaultCredentialName, input.defaultPasswordFile)] : []),
  ];
  return `[Unit]
Description=snapshift backup scheduler
After=network-online.target

[Service]
Type=simple
ExecStart=${input.nodePath} ${input.launcher} --home ${input.home} daemon
${credentials.map((line) => `${line}\n`).join('')}Restart=on-failure
KillSignal=SIGTERM
TimeoutStopSec=600

[Install]
WantedBy=multi-user.target
`;
}

function credentialLine(name: string, passwordFile: string): string {
  const path = resolve(passwordFile);
  // systemd splits the setting at white space and reads quotes and backslashes: a plain path only.
  if (!/^[^\s"'\\]+$/.test(path)) throw new SnapshiftError('USAGE', `password file ${JSON.stringify(path)} cannot be named in a systemd unit (spaces, quotes or backslashes): move it to a plain path`);
  return `LoadCredential=${name}:${path}`;
}
