// What a device certificate names, from the registry (never from a CSR): one definition for every
// path that issues device certificates (EST and the API through issueForDevice, factory stamps).

import { encodeName } from '../pki/names.js';

export function deviceSubject(device: { readonly udid: string; readonly serialNumber: string | null }, product: string, org: string): Buffer {
  return encodeName([
    ...(device.serialNumber ? [{ type: 'SERIALNUMBER', value: device.serialNumber }] : []),
    { type: 'CN', value: device.udid },
    { type: 'OU', value: product },
    { type: 'O', value: org },
  ]);
}

/** The subjectAltName URIs: the UDID, and the serial number when the registry has one. */
export function deviceUris(device: { readonly udid: string; readonly serialNumber: string | null }): string[] {
  return [`urn:hallmark:udid:${device.udid}`, ...(device.serialNumber ? [`urn:hallmark:serial:${encodeURIComponent(device.serialNumber)}`] : [])];
}
