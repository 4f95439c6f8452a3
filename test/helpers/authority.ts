// An initialised authority in a temporary directory, for tests that need a whole CA.

import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { initAuthority } from '../../src/authority/init.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';

export const TEST_PASSPHRASE = 'test passphrase, not for production';

export interface TestAuthority {
  readonly dir: string;
  readonly home: string;
  readonly rootDir: string;
  readonly passphrase: string;
  /** PEM files: root.pem and issuing-1.pem in dir. */
  readonly rootPem: string;
  readonly intermediatePem: string;
  cleanup(): Promise<void>;
}

export async function createTestAuthority(options: { org?: string } = {}): Promise<TestAuthority> {
  const dir = await mkdtemp(join(tmpdir(), 'hallmark-test-'));
  const home = join(dir, 'home');
  const rootDir = join(dir, 'root');
  await initAuthority({ home, rootDir, org: options.org ?? 'Test Org', passphrase: TEST_PASSPHRASE, keyBackend: 'file', actor: 'test' });
  const { Store } = await import('../../src/store/database.js');
  const { CaDirectory } = await import('../../src/authority/ca-directory.js');
  const { loadHomeConfig, databaseUrl } = await import('../../src/authority/home.js');
  const store = await Store.open({ url: databaseUrl(home) });
  const directory = new CaDirectory(store, await loadHomeConfig(home));
  const [intermediate, root] = await directory.caChain('issuing-1');
  await store.close();
  const rootPem = join(dir, 'root.pem');
  const intermediatePem = join(dir, 'issuing-1.pem');
  await writeFile(rootPem, encodePem('CERTIFICATE', root!));
  await writeFile(intermediatePem, encodePem('CERTIFICATE', intermediate!));
  return { dir, home, rootDir, passphrase: TEST_PASSPHRASE, rootPem, intermediatePem, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

export function deviceCsr(cn = 'device-1', curve = 'P-256'): { csrPem: string; privateKey: KeyObject } {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: curve });
  return { csrPem: encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString(`CN=${cn}`), privateKey })), privateKey };
}
