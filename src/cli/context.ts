// Opening the authority for a CLI command: the full Authority (needs the passphrase) or a
// read-only CA directory over the store (no passphrase).

import { Authority } from '../authority/authority.js';
import { CaDirectory } from '../authority/ca-directory.js';
import { databaseUrl, loadHomeConfig, resolveHome } from '../authority/home.js';
import { Store } from '../store/database.js';
import { readPassphrase, str, type ParsedArgs } from './io.js';

export async function withAuthority<T>(args: ParsedArgs, fn: (authority: Authority) => Promise<T>): Promise<T> {
  const home = resolveHome(str(args, 'home'));
  await loadHomeConfig(home); // NOT_INITIALISED before asking for a passphrase
  const passphrase = await readPassphrase(args);
  const authority = await Authority.open(home, passphrase);
  try {
    return await fn(authority);
  } finally {
    await authority.close();
  }
}

export async function withStoreOnly<T>(args: ParsedArgs, fn: (directory: CaDirectory) => Promise<T>): Promise<T> {
  const home = resolveHome(str(args, 'home'));
  const config = await loadHomeConfig(home);
  const store = await Store.open({ url: databaseUrl(home) });
  try {
    return await fn(new CaDirectory(store, config));
  } finally {
    await store.close();
  }
}
