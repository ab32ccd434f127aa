import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog, SessionState } from '../../src/catalog/index.ts';
import { parseJobDefinition } from '../../src/jobs/job-definition.ts';
import { jobPassword } from '../../src/jobs/job-password.ts';
import { initRepository } from '../../src/repository/index.ts';
import { makeWorkspace, runCli } from '../support/workspace.ts';

let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
const children: ChildProcess[] = [];
const path = (...parts: string[]) => join(workspace.dir, ...parts);

before(async () => {
  workspace = await makeWorkspace('creds');
  mkdirSync(path('home'));
  mkdirSync(path('credentials'));
  await initRepository(path('encrypted'), { encryption: true, password: 'right' });
  await initRepository(path('plain'), { encryption: false });
  writeFileSync(path('job-a.pass'), 'right\n', { mode: 0o600 });
  writeFileSync(path('default.pass'), 'right\n', { mode: 0o600 });
});
after(async () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  await workspace?.cleanup();
});

/** bin/snapshift's environment without any password of the test runner's. */
function cleanEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries(process.env)) if (value !== undefined && name !== 'SNAPSHIFT_PASSWORD' && name !== 'CREDENTIALS_DIRECTORY') env[name] = value;
  return { ...env, SNAPSHIFT_HOME: path('home'), ...extra };
}

test('daemon --install-unit passes each job\'s password file, and a default one, as systemd credentials', async () => {
  const env = cleanEnv();
  for (const args of [
    ['job', 'create', 'job-a', '--vm', 'vm1', '--repo', path('encrypted'), '--password-file', path('job-a.pass'), '--schedule', '0 22 * * *'],
    ['job', 'create', 'job-b', '--vm', 'vm2', '--repo', path('encrypted'), '--schedule', '0 23 * * *'],
    ['job', 'create', 'job-c', '--vm', 'vm3', '--repo', path('plain'), '--schedule', '0 21 * * *'],
  ]) {
    const created = await runCli(args, env);
    assert.equal(created.status, 0, created.stderr);
  }
  const unitPath = path('snapshift.service');
  const install = await runCli(['daemon', '--install-unit', unitPath, '--password-file', path('default.pass')], env);
  assert.equal(install.status, 0, install.stderr);
  assert.equal(install.stderr, '');
  const unit = readFileSync(unitPath, 'utf8');
  const lines = unit.split('\n');
  assert.deepEqual(
    lines.filter((line) => line.startsWith('LoadCredential=')),
    [`LoadCredential=snapshift-job-job-a:${path('job-a.pass')}`, `LoadCredential=snapshift-password:${path('default.pass')}`],
  );
  assert.ok(lines.some((line) => line.startsWith('ExecStart=') && line.endsWith(` --home ${path('home')} daemon`)), unit);
  assert.doesNotMatch(unit, /SNAPSHIFT_PASSWORD|Environment|right/, 'no password, and no password variable, in the unit');
  assert.match(unit, /^\[Service\]$/m);

  // Without a default, the scheduled job on an encrypted repository that has no password file is named.
  const bare = await runCli(['daemon', '--install-unit', unitPath], env);
  assert.equal(bare.status, 0, bare.stderr);
  assert.equal(bare.stderr, 'snapshift: warning: job job-b: its repository is encrypted and it has no password file: its runs will fail (give it --password-file, or pass --password-file here)\n');
  assert.deepEqual(readFileSync(unitPath, 'utf8').split('\n').filter((line) => line.startsWith('LoadCredential=')), [`LoadCredential=snapshift-job-job-a:${path('job-a.pass')}`]);
});

test('a job\'s password comes from its credential, its password file, the default credential or SNAPSHIFT_PASSWORD, in that order', async () => {
  const job = (fields: Record<string, unknown>) => parseJobDefinition({ name: 'j', vms: ['vm1'], repository: path('encrypted'), ...fields });
  const credentials = path('credentials');
  writeFileSync(join(credentials, 'snapshift-job-j'), 'from-own-credential\n');
  writeFileSync(join(credentials, 'snapshift-password'), 'from-default-credential');
  const env = (extra: Record<string, string> = {}) => ({ PATH: '/usr/bin', ...extra });
  assert.equal(await jobPassword(job({ passwordFile: path('job-a.pass') }), { env: env({ CREDENTIALS_DIRECTORY: credentials }) }), 'from-own-credential');
  assert.equal(await jobPassword(parseJobDefinition({ name: 'k', vms: ['vm1'], repository: path('encrypted'), passwordFile: path('job-a.pass') }), { env: env({ CREDENTIALS_DIRECTORY: credentials }) }), 'right', 'the job\'s file before the default credential');
  assert.equal(await jobPassword(parseJobDefinition({ name: 'k', vms: ['vm1'], repository: path('encrypted') }), { env: env({ CREDENTIALS_DIRECTORY: credentials, SNAPSHIFT_PASSWORD: 'from-env' }) }), 'from-default-credential');
  assert.equal(await jobPassword(job({}), { env: env({ SNAPSHIFT_PASSWORD: 'from-env' }) }), 'from-env');
  assert.equal(await jobPassword(job({ repository: path('plain') }), { env: env({ CREDENTIALS_DIRECTORY: credentials }) }), undefined, 'an unencrypted repository needs none');
  assert.equal(await jobPassword(job({}), { env: env(), prompt: async () => 'typed' }), 'typed');
  await assert.rejects(jobPassword(job({}), { env: env() }), (error: { code?: string; message?: string }) => {
    assert.equal(error.code, 'REPO_PASSWORD_REQUIRED');
    assert.match(error.message!, /^job j: repository .* is encrypted and no password was found \(no credential snapshift-job-j or snapshift-password: CREDENTIALS_DIRECTORY is not set, no password file in the job, no SNAPSHIFT_PASSWORD\)/);
    return true;
  });
});

test('a scheduled run that cannot start (no password) is a Failed session with the reason; one with a credential opens its repository', async () => {
  // What systemd would make of a unit whose only credential is this job's password file.
  mkdirSync(path('service-credentials'));
  const env = cleanEnv({ CREDENTIALS_DIRECTORY: path('service-credentials') });
  writeFileSync(path('service-credentials', 'snapshift-job-with-credential'), 'right\n');
  for (const args of [
    // Both repositories are encrypted; only the second job's password is in the credentials folder.
    ['job', 'create', 'no-password', '--vm', 'ghost', '--repo', path('encrypted'), '--schedule', '* * * * * *'],
    ['job', 'create', 'with-credential', '--vm', 'ghost', '--repo', path('encrypted'), '--schedule', '* * * * * *'],
  ]) {
    const created = await runCli(args, env);
    assert.equal(created.status, 0, created.stderr);
  }
  const child = spawn('bin/snapshift', ['daemon'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let log = '';
  child.stderr!.on('data', (chunk: Buffer) => (log += chunk.toString()));
  const deadline = Date.now() + 120_000;
  while (!(/job no-password ended: Failed/.test(log) && /job with-credential ended: Failed/.test(log))) {
    if (child.exitCode !== null || Date.now() > deadline) assert.fail(`the daemon never ended both jobs; log:\n${log}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  await exited;
  assert.doesNotMatch(log, /could not run/, 'no run is lost to the log alone');

  using catalog = Catalog.open(path('home'));
  const noPassword = catalog.jobs.listSessions('no-password').at(-1)!;
  assert.equal(noPassword.state, SessionState.failed);
  assert.match(String(noPassword.summary.error), /^job no-password: repository .* is encrypted and no password was found/);
  const [task] = catalog.jobs.listTasks(noPassword.id);
  assert.equal(task!.state, SessionState.failed);
  assert.equal(task!.reason, noPassword.summary.error);

  // The credential opened the repository: the run got as far as looking for the VM.
  const withCredential = catalog.jobs.listSessions('with-credential').at(-1)!;
  assert.equal(withCredential.state, SessionState.failed);
  assert.equal(withCredential.summary.error, undefined);
  assert.equal(catalog.jobs.listTasks(withCredential.id)[0]!.reason, 'no VM named "ghost" (add it with "snapshift host add")');

  const show = await runCli(['session', 'show', noPassword.id.slice(0, 8)], env);
  assert.match(show.stdout, /ghost: Failed — job no-password: repository .* is encrypted and no password was found/);
});
