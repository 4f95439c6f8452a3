// Opens the key backend a configuration names. The PKCS#11 PIN comes from HALLMARK_PKCS11_PIN
// (HALLMARK_ROOT_PKCS11_PIN first for the root token), falling back to the passphrase.

import { HallmarkError } from '../errors.js';
import { FileKeyBackend } from './file-backend.js';
import type { KeyBackend } from './key-backend.js';
import type { Pkcs11Settings } from '../authority/home.js';

export async function openPkcs11(settings: Pkcs11Settings, passphrase: string, role: 'ca' | 'root' = 'ca'): Promise<KeyBackend> {
  // The root token may have its own PIN (HALLMARK_ROOT_PKCS11_PIN).
  const pin = (role === 'root' ? process.env.HALLMARK_ROOT_PKCS11_PIN : undefined) || process.env.HALLMARK_PKCS11_PIN || passphrase;
  if (!pin) throw new HallmarkError('PASSPHRASE_REQUIRED', 'a PKCS#11 PIN is needed (HALLMARK_PKCS11_PIN, or the passphrase)');
  const { Pkcs11KeyBackend } = await import('./pkcs11-backend.js');
  return Pkcs11KeyBackend.open({ module: settings.module, token: settings.token, pin });
}

export async function openCaBackend(config: { keyBackend: { kind: 'file' } | ({ kind: 'pkcs11' } & Pkcs11Settings) }, fileBackend: FileKeyBackend, passphrase: string): Promise<KeyBackend> {
  return config.keyBackend.kind === 'pkcs11' ? openPkcs11(config.keyBackend, passphrase) : fileBackend;
}
