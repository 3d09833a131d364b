"""Every SQL statement of Quartermaster: one module per aggregate, one function per transition."""
