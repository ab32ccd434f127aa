// npm run bench -- <name> [options]: dispatches to bench/<name>.ts.
const benches: Record<string, () => Promise<{ main(args: string[]): Promise<void> }>> = {
  repository: () => import('./repository.ts'),
  incremental: () => import('./incremental.ts'),
  regular: () => import('./regular.ts'),
  modes: () => import('./modes.ts'),
  restore: () => import('./restore.ts'),
};

const [name, ...args] = process.argv.slice(2);
const load = name === undefined ? undefined : benches[name];
if (!load) {
  process.stderr.write(`usage: npm run bench -- <${Object.keys(benches).join('|')}> [options]\n`);
  process.exitCode = 64;
} else {
  await (await load()).main(args);
}
