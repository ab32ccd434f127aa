// Worker bootstrap: under tsx (no build step) a worker thread must register tsx before importing a .ts entry.
import { workerData } from 'node:worker_threads';
if (workerData.__entry.endsWith('.ts')) {
  const { register } = await import('tsx/esm/api');
  register();
}
await import(workerData.__entry);
