/* helpers with no mention of the p-word in code */
static int count_lines(const char *s) {
	int n = 0;
	while (*s) n += *s++ == '\n';
	return n;
}
