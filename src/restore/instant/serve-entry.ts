// The NBD server behind an instant recovery, run as a process of its own by detached-server.ts: what
// `snapshift serve VM --point P --socket S --json --exit-when-unused` does, without loading the whole CLI,
// which makes it serve about a second sooner (the VM cannot start before it serves). The password comes
// from SNAPSHIFT_PASSWORD in its environment, never from its command line.
import { parseArgs } from 'node:util';
import { messageOf } from '../../core/errors.ts';
import { openRepository, repositoryEncryption } from '../../repository/index.ts';
import { serveRestorePoint } from '../serve-restore-point.ts';

const { values, positionals } = parseArgs({ options: { repo: { type: 'string' }, point: { type: 'string' }, socket: { type: 'string' } }, allowPositionals: true });
const [vmName] = positionals;
const stop = new AbortController();
for (const signal of ['SIGTERM', 'SIGINT'] as const) process.once(signal, () => stop.abort(signal));
try {
  if (!vmName || !values.repo || !values.point || !values.socket) throw new Error('usage: serve-entry VM --repo PATH --point ID --socket PATH');
  const encrypted = (await repositoryEncryption(values.repo)) === 'encrypted';
  await using repository = await openRepository(values.repo, { password: encrypted ? process.env.SNAPSHIFT_PASSWORD : undefined });
  await serveRestorePoint({
    repository,
    vmName,
    pointId: values.point,
    socketPath: values.socket,
    exitWhenUnused: true,
    signal: stop.signal,
    onWarning: (message) => process.stderr.write(`snapshift: warning: ${message}\n`),
    onError: (message) => process.stderr.write(`snapshift: serve: ${message}\n`),
    onReady: (served) => process.stdout.write(`${JSON.stringify(served)}\n`),
  });
} catch (error) {
  process.stderr.write(`snapshift: ${messageOf(error)}\n`);
  process.exitCode = 2;
}
